"""kohya and PEFT export of one concept's factors, and import of a foreign LoRA file.

Everything here works on plain data: `factors` maps a module name to `(A, B)` with A = "lora_down"
(r x n) and B = "lora_up" (m x r), dW = B @ A. Files are safetensors only (no pickle), written atomically.
A kohya file stores alpha = r per module, so the scale alpha/r is 1 and the stored pair is dW exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from . import naming as nm
from .files import atomic_write_bytes

Factors = Mapping[str, tuple[Tensor, Tensor]]
Kernels = Mapping[str, Sequence[int]]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# kohya `ss_base_model_version` -> (SAI modelspec architecture, implementation, resolution, ss_v2)
_STABILITY = "https://github.com/Stability-AI/generative-models"
BASE_MODELS: dict[str, tuple[str, str, str, bool]] = {
    "sd_v1": ("stable-diffusion-v1", "diffusers", "512x512", False),
    "sd_v2": ("stable-diffusion-v2-512", "diffusers", "512x512", True),
    "sd_v2_v": ("stable-diffusion-v2-768-v", "diffusers", "768x768", True),
    "sdxl_base_v1-0": ("stable-diffusion-xl-v1-base", _STABILITY, "1024x1024", False),
}
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl"}
_TEXT_ENCODER = re.compile(r"^(lora_te\d*_|text_encoders?(_\d+)?\.|te\d?\.|text_model\.)")
_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".alpha", "alpha"),
)
# a module carrying one of these is not a plain LoRA pair (Tucker mid, DoRA): it is skipped whole
_UNSUPPORTED = (
    ".lora_mid.weight",
    ".dora_scale",
    ".lora_magnitude_vector",
    ".lora_magnitude_vector.default.weight",
)
# dotted prefixes -> the naming the rest of the key is in
_DOTTED_PREFIXES = (
    ("base_model.model.", "diffusers"),
    ("unet.", "diffusers"),
    ("model.diffusion_model.", "ldm"),
    ("diffusion_model.", "ldm"),
)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """ "fp16" | "bf16" | "fp32" or a torch float dtype -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported save dtype {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported save dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _check_pair(name: str, a: Tensor, b: Tensor) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"{name}: need A (r x n) and B (m x r), got {tuple(a.shape)} and {tuple(b.shape)}")


def _balance(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Move a power of two between A and B so both use the half-precision range alike (B @ A unchanged)."""
    amax, bmax = a.abs().max().item(), b.abs().max().item()
    if amax == 0 or bmax == 0:
        return a, b
    s = 2.0 ** round(0.5 * math.log2(bmax / amax))
    return a * s, b / s


def _file_pairs(factors: Factors, kernels: Kernels | None, dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (down, up) in file layout: Conv2d down (r, in, kh, kw), up (m, r, 1, 1)."""
    if not factors:
        raise ValueError("no layers to export: `factors` is empty")
    kernels = kernels or {}
    out = {}
    for name, (a, b) in factors.items():
        _check_pair(name, a, b)
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        if dtype != torch.float32:
            a, b = _balance(a, b)
        kernel = tuple(kernels.get(name) or ())
        if kernel:
            k = math.prod(kernel)
            if a.shape[1] % k:
                raise ValueError(f"{name}: n={a.shape[1]} is not in_channels * {kernel}")
            a = a.reshape(a.shape[0], a.shape[1] // k, *kernel)
            b = b.reshape(*b.shape, *(1,) * len(kernel))
        out[name] = (a.to(dtype, copy=True).contiguous(), b.to(dtype, copy=True).contiguous())
    return out


def kohya_state_dict(
    factors: Factors,
    kernels: Kernels | None = None,
    prefix: str = "lora_unet",
    dtype: str | torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """kohya tensors: `<prefix>_<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` = r.

    `kernels[name]`: the spatial kernel (kh, kw) of a Conv2d layer (also (1, 1)); absent or None = Linear.
    """
    sd: dict[str, Tensor] = {}
    for name, (down, up) in _file_pairs(factors, kernels, resolve_dtype(dtype)).items():
        key = nm.to_kohya_name(name, prefix)
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(float(down.shape[0]), dtype=down.dtype)
    return sd


def peft_state_dict(
    factors: Factors,
    kernels: Kernels | None = None,
    prefix: str = "unet",
    dtype: str | torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """diffusers/PEFT tensors: `<prefix>.<name>.lora_A.weight` (down), `.lora_B.weight` (up); scale 1."""
    sd: dict[str, Tensor] = {}
    for name, (down, up) in _file_pairs(factors, kernels, resolve_dtype(dtype)).items():
        sd[f"{prefix}.{name}.lora_A.weight"] = down
        sd[f"{prefix}.{name}.lora_B.weight"] = up
    return sd


def lora_metadata(
    factors: Factors,
    triggers: Sequence[str],
    title: str,
    base_model_version: str = "sd_v1",
    extra_metadata: Mapping[str, str] | None = None,
    concept_name: str | None = None,
    num_images: int | None = None,
) -> dict[str, str]:
    """kohya `ss_*` and SAI `modelspec.*` header fields (all strings) that A1111/ComfyUI/Forge show."""
    if base_model_version not in BASE_MODELS:
        raise ValueError(f"unknown base_model_version {base_model_version!r}; known: {sorted(BASE_MODELS)}")
    arch, impl, resolution, v2 = BASE_MODELS[base_model_version]
    ranks = sorted({int(a.shape[0]) for a, _ in factors.values()})
    dim = str(ranks[-1]) if ranks else "0"
    count = int(num_images) if num_images else 1
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": dim,
        "ss_output_name": title,
        "ss_base_model_version": base_model_version,
        "ss_v2": str(v2),
        "ss_tag_frequency": json.dumps({concept_name or title: {t: count for t in triggers}}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(triggers)
    if num_images:
        meta["ss_num_train_images"] = str(int(num_images))
    if len(ranks) > 1:
        meta["ss_network_args"] = json.dumps({"ranks": ranks})
    for k, v in (extra_metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must be str -> str, got {k!r}: {type(v).__name__}")
        meta[k] = v
    return meta


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file atomically: a temp file in the same folder, fsync, then os.replace."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: LoRA files are written as .safetensors")
    return atomic_write_bytes(path, safetensors_bytes(dict(tensors), metadata=dict(metadata)))


def save_kohya(
    path: str | os.PathLike,
    factors: Factors,
    kernels: Kernels | None,
    triggers: Sequence[str],
    title: str,
    base_model_version: str = "sd_v1",
    extra_metadata: Mapping[str, str] | None = None,
    *,
    dtype: str | torch.dtype = "fp16",
    concept_name: str | None = None,
    num_images: int | None = None,
) -> Path:
    """One concept as a kohya LoRA (`lora_unet_*`, alpha = r) with kohya/A1111 metadata.

    Names are written as given (diffusers or LDM module names; ComfyUI, A1111 and Forge read both).
    `dtype`: "fp16" (default, what kohya users get), "bf16" or "fp32" (bit-exact factors).
    """
    meta = lora_metadata(factors, triggers, title, base_model_version, extra_metadata, concept_name, num_images)
    return write_safetensors(path, kohya_state_dict(factors, kernels, dtype=dtype), meta)


def save_peft(
    path: str | os.PathLike,
    factors: Factors,
    kernels: Kernels | None = None,
    triggers: Sequence[str] = (),
    title: str = "",
    base_model_version: str = "sd_v1",
    extra_metadata: Mapping[str, str] | None = None,
    *,
    dtype: str | torch.dtype = "fp16",
    concept_name: str | None = None,
    num_images: int | None = None,
) -> Path:
    """One concept in diffusers/PEFT form (`unet.<name>.lora_A/lora_B`), loadable by `load_lora_weights`.

    `factors` must use diffusers module names. ComfyUI does not map these keys for SD1.5 attention:
    ship `save_kohya` files to ComfyUI/A1111 users.
    """
    meta = lora_metadata(factors, triggers, title, base_model_version, extra_metadata, concept_name, num_images)
    return write_safetensors(path, peft_state_dict(factors, kernels, dtype=dtype), meta)


# ---------------------------------------------------------------- import


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _dotted(stem: str) -> tuple[str, str | None]:
    """Strip a known dotted prefix -> (module name, the naming the prefix implies or None)."""
    for prefix, naming in _DOTTED_PREFIXES:
        if stem.startswith(prefix):
            return stem[len(prefix) :], naming
    return stem, None


def _peft_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    cfg = json.loads(raw)
    return {k.removeprefix("unet."): v for k, v in cfg.items() if not k.startswith("text_encoder")}


def _peft_scale(cfg: Mapping[str, Any], raw_name: str, rank: int) -> float:
    alpha = cfg.get("lora_alpha")
    for pattern, a in (cfg.get("alpha_pattern") or {}).items():
        if raw_name == pattern or raw_name.endswith("." + pattern):
            alpha = a
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _triggers(metadata: Mapping[str, str], top: int = 5) -> list[str]:
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        return [t.strip() for t in phrase.split(",") if t.strip()]
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return []
    counts: dict[str, int] = {}
    for tags in freq.values() if isinstance(freq, dict) else ():
        for tag, n in tags.items() if isinstance(tags, dict) else ():
            counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:top] if t]


def _load(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path.name}: pickle-based LoRA files are not read (they can run code); convert it to .safetensors first"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path.name}: not a readable .safetensors file ({e})") from e


def _scan(tensors: Mapping[str, Tensor]) -> tuple[list[tuple[str, str, str]], list[str], dict[str, int]]:
    """Sort keys into LoRA parts (key, module stem, role), unknown keys and counts of skipped kinds."""
    text, unsupported, parts, unknown, diffs = set(), set(), [], [], 0
    for key in tensors:
        if _TEXT_ENCODER.match(key):
            text.add(key.rsplit(".lora", 1)[0].removesuffix(".alpha"))
        elif key.endswith(_UNSUPPORTED):
            unsupported.add(next(key[: -len(s)] for s in _UNSUPPORTED if key.endswith(s)))
        elif key.endswith((".diff", ".diff_b")):
            diffs += 1
        elif (split := _split_key(key)) is None:
            unknown.append(key)
        else:
            parts.append((key, *split))
    parts = [p for p in parts if p[1] not in unsupported]
    return parts, unknown, {"text": len(text), "unsupported": len(unsupported), "diffs": diffs}


def _warn_skipped(path: Path, skipped: Mapping[str, int]) -> None:
    messages = {
        "text": "text-encoder LoRA modules ignored",
        "unsupported": "modules with Tucker (lora_mid) or DoRA tensors skipped",
        "diffs": "full-weight diff/diff_b tensors (not low-rank) skipped",
    }
    for kind, n in skipped.items():
        if n:
            warnings.warn(f"{path.name}: {n} {messages[kind]}", stacklevel=3)


def _pair(path: Path, name: str, g: Mapping[str, Any], peft: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """One module's (down r x n, up * scale m x r) in fp32."""
    if "down" not in g or "up" not in g:
        raise ValueError(f"{path.name}: module {name!r} lacks its lora_down or lora_up tensor")
    down, up = g["down"].float(), g["up"].float()
    r = down.shape[0]
    if up.ndim > 2 and any(s != 1 for s in up.shape[2:]):
        raise ValueError(f"{path.name}: {name!r} has a non-1x1 lora_up (unsupported adapter type)")
    down, up = down.reshape(r, -1), up.reshape(up.shape[0], -1)
    if up.shape[1] != r:
        raise ValueError(f"{path.name}: {name!r} down/up ranks differ: {r} vs {up.shape[1]}")
    if "alpha" in g:
        alpha = float(g["alpha"].float().item())
        scale = alpha / r if alpha else 1.0
    else:
        scale = _peft_scale(peft, g["raw"], r)
    return down.contiguous(), (up * scale if scale != 1.0 else up).contiguous()


def _name_map(name_map: Any, stems: Iterable[str]) -> dict[str, str]:
    if name_map is None:
        return nm.diffusers_to_ldm_map(nm.guess_structure(stems))
    if isinstance(name_map, Mapping) and all(isinstance(v, str) for v in name_map.values()):
        return dict(name_map)
    return nm.diffusers_to_ldm_map(name_map)


def read_lora_file(
    path: str | os.PathLike,
    naming: str = "diffusers",
    name_map: Any = None,
    *,
    module_names: Iterable[str] | None = None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, str], list[str]]:
    """Read a UNet LoRA -> (name -> (down r x n, up*alpha/r m x r) fp32 2-D, metadata, triggers).

    Reads kohya (`lora_unet_*`, diffusers or LDM names), PEFT (`unet.*.lora_A/lora_B[.default]`) and
    ComfyUI trainer (`diffusion_model.<ldm path>.lora_up/down`) files; B @ A equals the file's dW.
    Names come back in `naming` ("diffusers" | "ldm"). `name_map`: a diffusers->LDM dict or anything
    `naming.unet_structure` accepts; None guesses SD1/2 or SDXL from the names. `module_names`: the
    target model's module names, for non-UNet models (resolves kohya names, allows unmapped names).
    Text-encoder keys are skipped with a warning.
    """
    if naming not in ("diffusers", "ldm"):
        raise ValueError(f"naming must be 'diffusers' or 'ldm', got {naming!r}")
    path = Path(path)
    tensors, metadata = _load(path)
    parts, unknown, skipped = _scan(tensors)
    d2l = _name_map(name_map, [_dotted(s)[0] if "." in s else s for _, s, _ in parts])
    l2d = {v: k for k, v in d2l.items()}
    targets = set(module_names or ())
    kohya = nm.kohya_lookup(set(d2l) | set(l2d) | targets)
    wanted, other = (d2l, l2d) if naming == "ldm" else (l2d, d2l)
    # `wanted` maps the other naming to the requested one; `other` lists names already in it

    def resolve(stem: str) -> str | None:
        if stem.startswith("lora_unet_"):
            name, implied = kohya.get(stem), None
            if name is None:
                return None
        else:
            name, implied = _dotted(stem)
        if name in other or name in targets:
            return name
        if name in wanted:
            return wanted[name]
        if implied == naming and not targets:
            return name
        return None

    groups: dict[str, dict[str, Any]] = {}
    for key, stem, role in parts:
        name = resolve(stem)
        if name is None:
            unknown.append(key)
            continue
        group = groups.setdefault(name, {"raw": _dotted(stem)[0]})
        if role in group:
            raise ValueError(f"{path.name}: two keys give {role} of module {name!r} (second: {key!r})")
        group[role] = tensors[key]

    _warn_skipped(path, skipped)
    if not groups:
        only_text = skipped["text"] and not unknown and not skipped["unsupported"] and not skipped["diffs"]
        what = "only text-encoder keys" if only_text else "no usable UNet LoRA keys"
        raise ValueError(f"{path.name}: {what}; first unknown keys: {unknown[:5]}")
    if unknown:
        warnings.warn(f"{path.name}: skipped {len(unknown)} unknown keys, first: {unknown[:5]}", stacklevel=2)
    peft = _peft_config(metadata)
    factors = {name: _pair(path, name, g, peft) for name, g in groups.items()}
    return factors, metadata, _triggers(metadata)
