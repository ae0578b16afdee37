"""What a bank file may hold: the header's types and limits, and every tensor's shape, dtype and values.

:func:`check_header` runs on the JSON header alone (file browsers read only that), :func:`check_tensors`
on the tensors a header names. Both raise :class:`SchemaError` with a message that names the concept and
the layer; :mod:`.bank` adds the file. The limits keep a hostile file from costing more than its size:
at most ``MAX_CONCEPTS`` concepts, each with its own tensors at every layer, so a file cannot name more
concepts than it has bytes for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .selection import MAX_NAME, control_characters

MAX_CONCEPTS = 1000  # the report's tables grow with the square of this
MAX_LAYERS = 20_000  # SDXL's every linear layer is about 2,000
MAX_WIDTH = 1 << 20  # in or out features of one layer
MAX_TRIGGERS = 64
MAX_TEXT = 1000  # characters of a trigger or another short string
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYER_KINDS = ("linear", "conv2d")


class SchemaError(ValueError):
    """A header or tensor that breaks the bank format; the message names the concept and layer."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _text(x: Any, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(x, str):
        raise SchemaError(f"{where} is {type(x).__name__}, not text")
    if len(x) > limit:
        raise SchemaError(f"{where} has {len(x)} characters (at most {limit})")
    bad = control_characters(x)
    if bad:
        raise SchemaError(f"{where} holds control characters ({', '.join(bad[:3])})")
    return x


def _dict(x: Any, where: str) -> dict:
    if not isinstance(x, dict):
        raise SchemaError(f"{where} is {type(x).__name__}, not a mapping")
    return x


def _list(x: Any, where: str, limit: int | None = None) -> list:
    if not isinstance(x, list):
        raise SchemaError(f"{where} is {type(x).__name__}, not a list")
    if limit is not None and len(x) > limit:
        raise SchemaError(f"{where} has {len(x)} entries (at most {limit})")
    return x


def _numbers(x: Any, where: str) -> None:
    if not all(_is_number(v) for v in _list(x, where)):
        raise SchemaError(f"{where} holds a value that is not a number")


def _number_map(x: Any, where: str) -> None:
    for k, v in _dict(x, where).items():
        if not _is_number(v):
            raise SchemaError(f"{where}[{k!r}] is {type(v).__name__}, not a number")


def check_header(header: Any, tensor_count: int | None = None) -> None:
    """The header's structure and limits (``tensor_count``: how many tensors the file holds, when known)."""
    h = _dict(header, "the header")
    layers = _list(h.get("layers"), "the layer list", MAX_LAYERS)
    if not layers:
        raise SchemaError("the layer list is empty")
    seen: set[str] = set()
    for i, entry in enumerate(layers):
        if not (isinstance(entry, list) and len(entry) == 5):
            raise SchemaError(f"layer {i} is not [name, kind, out, in, kernel]")
        name, kind, m, n, kernel = entry
        name = _text(name, f"layer {i}'s name")
        if not name or name in seen:
            raise SchemaError(f"layer {i}'s name {name!r} is empty or repeated")
        seen.add(name)
        if kind not in LAYER_KINDS:
            raise SchemaError(f"layer {name!r} has kind {kind!r}; expected one of {', '.join(LAYER_KINDS)}")
        if not (_is_int(m) and _is_int(n) and 1 <= m <= MAX_WIDTH and 1 <= n <= MAX_WIDTH):
            raise SchemaError(f"layer {name!r} has shape {m!r} x {n!r}; expected two whole numbers >= 1")
        if not (
            isinstance(kernel, list) and len(kernel) == 2 and all(_is_int(k) and 1 <= k <= n for k in kernel)
        ) or n % (kernel[0] * kernel[1]):
            raise SchemaError(f"layer {name!r} has kernel {kernel!r}, which does not divide its {n} inputs")
    for key in ("layer_naming", "architecture", "fingerprint"):
        if key in h:
            _text(h[key], f"the header's {key}", 100)
    traces = _dict(h.get("prior_traces", {}), "the prior's traces")
    for k, v in traces.items():
        _layer_index(k, len(layers), "the prior")
        if not _is_number(v):
            raise SchemaError(f"the prior's trace at layer {k} is not a number")
    concepts = _list(h.get("concepts"), "the concept list", MAX_CONCEPTS)
    if tensor_count is not None and len(concepts) * len(layers) * 2 > tensor_count:
        raise SchemaError(
            f"the header lists {len(concepts)} concepts over {len(layers)} layers, but the file holds only "
            f"{tensor_count} tensors"
        )
    names: set[str] = set()
    for ci, c in enumerate(concepts):
        _check_concept(c, ci, len(layers), names)
    _check_meta(_dict(h.get("meta", {}), "the header's meta"))


def _layer_index(key: Any, count: int, where: str) -> int:
    if not (isinstance(key, str) and key.isdigit() and int(key) < count):
        raise SchemaError(f"{where} names layer {key!r}, which the layer list does not have")
    return int(key)


def _check_concept(c: Any, ci: int, layer_count: int, names: set[str]) -> None:
    c = _dict(c, f"concept {ci}")
    name = _text(c.get("name"), f"concept {ci}'s name", MAX_NAME)
    if not name.strip() or name in names:
        raise SchemaError(f"concept {ci}'s name {name!r} is empty or repeated")
    names.add(name)
    where = f"concept {name!r}"
    for i, t in enumerate(_list(c.get("triggers"), f"{where}'s triggers", MAX_TRIGGERS)):
        _text(t, f"{where}'s trigger {i}")
    if not (_is_int(c.get("rank")) and 1 <= c["rank"] <= MAX_WIDTH):
        raise SchemaError(f"{where} has rank {c.get('rank')!r}; expected a whole number >= 1")
    _text(c.get("method"), f"{where}'s method", 100)
    if "source" in c:
        _text(c["source"], f"{where}'s source", 100)
    if "loss_curve" in c:
        _numbers(c["loss_curve"], f"{where}'s loss curve")
    if "timings" in c:
        _number_map(c["timings"], f"{where}'s timings")
    _check_info(_dict(c.get("info", {}), f"{where}'s info"), where)
    layers = _dict(c.get("layers"), f"{where}'s layers")
    if len(layers) != layer_count:
        raise SchemaError(f"{where} has {len(layers)} layers; the bank has {layer_count}")
    for key, entry in layers.items():
        li = _layer_index(key, layer_count, where)
        entry = _dict(entry, f"{where} at layer {li}")
        if not isinstance(entry.get("soft", False), bool):
            raise SchemaError(f"{where} at layer {li}: 'soft' is not true or false")
        if "trace" in entry and not _is_number(entry["trace"]):
            raise SchemaError(f"{where} at layer {li}: the trace is not a number")
        if entry.get("protection") is not None:
            _check_protection(entry["protection"], f"{where} at layer {li}")


def _check_protection(p: Any, where: str) -> None:
    p = _dict(p, f"{where}: protection")
    for key in ("protected", "energy", "free"):
        if key in p and not _is_number(p[key]):
            raise SchemaError(f"{where}: protection's {key!r} is not a number")
    if not all(key in p for key in ("protected", "energy", "free")):
        raise SchemaError(f"{where}: protection lacks 'protected', 'energy' or 'free'")


def _check_info(info: dict, where: str) -> None:
    """The parts of a concept's info that the report and the hosts read."""
    if "self_energy" in info and not _is_number(info["self_energy"]):
        raise SchemaError(f"{where}'s self energy is not a number")
    if "received_interference" in info:
        _number_map(info["received_interference"], f"{where}'s received interference")
    if info.get("delta_norm_ratio") is not None:
        ratio = _dict(info["delta_norm_ratio"], f"{where}'s weight change")
        if not all(_is_number(ratio.get(k)) for k in ("mean", "max")):
            raise SchemaError(f"{where}'s weight change lacks a numeric mean or max")
    if "budget" in info:
        budget = _dict(info["budget"], f"{where}'s budget")
        for key in ("budget", "achieved", "layers_over", "layers"):
            if not _is_number(budget.get(key)):
                raise SchemaError(f"{where}'s budget lacks a numeric {key!r}")
        if not isinstance(budget.get("met"), bool):
            raise SchemaError(f"{where}'s budget lacks 'met' (true or false)")
    if "config" in info:
        _dict(info["config"], f"{where}'s config")


def _check_meta(meta: dict) -> None:
    if "weight_norms" in meta:
        _number_map(meta["weight_norms"], "the base weights' norms")
    if "ortho_seed" in meta and not _is_int(meta["ortho_seed"]):
        raise SchemaError("the header's ortho_seed is not a whole number")


# --------------------------------------------------------------------------------------------- tensors


def _tensor(tensors: Mapping[str, torch.Tensor], key: str, shape: tuple[int | None, ...], where: str) -> torch.Tensor:
    """``tensors[key]`` as float32 after checking presence, dtype, shape (None: any size) and finiteness."""
    t = tensors.get(key)
    if t is None:
        raise SchemaError(f"{where}: tensor {key!r} is missing")
    if t.dtype not in FLOAT_DTYPES:
        raise SchemaError(f"{where}: tensor {key!r} has dtype {t.dtype}; expected a float type")
    fits = t.dim() == len(shape) and all(w is None or h == w for h, w in zip(t.shape, shape, strict=True))
    if not fits:
        want = " x ".join("?" if s is None else str(s) for s in shape)
        raise SchemaError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}; expected {want}")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise SchemaError(f"{where}: tensor {key!r} holds NaN or infinite values")
    return t


def check_sketch(tensors: Mapping[str, torch.Tensor], prefix: str, n: int, where: str) -> tuple[torch.Tensor, ...]:
    """(U n x k, s k) of a sketch, k <= n."""
    u = _tensor(tensors, f"{prefix}.U", (n, None), where)
    if u.shape[1] > n:
        raise SchemaError(f"{where}: sketch {prefix!r} has {u.shape[1]} directions in {n} dimensions")
    s = _tensor(tensors, f"{prefix}.s", (u.shape[1],), where)
    return u, s


def check_factors(
    tensors: Mapping[str, torch.Tensor], prefix: str, m: int, n: int, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A r x n, B m x r) of one concept at one layer, 1 <= r <= n."""
    a = _tensor(tensors, f"{prefix}.A", (None, n), where)
    if not 1 <= a.shape[0] <= n:
        raise SchemaError(f"{where}: the basis {prefix}.A has {a.shape[0]} rows; expected 1 to {n}")
    b = _tensor(tensors, f"{prefix}.B", (m, a.shape[0]), where)
    return a, b


def check_moment(tensors: Mapping[str, torch.Tensor], key: str, n: int, where: str) -> torch.Tensor | None:
    return _tensor(tensors, key, (n, n), where) if key in tensors else None
