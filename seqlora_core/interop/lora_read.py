"""Reading LoRA files: kohya, PEFT/diffusers and ComfyUI-trainer UNet LoRAs -> plain factors.

Returns `(down A, up B * alpha/r)` per module, so B @ A is the file's dW exactly, with module names in
the naming asked for (diffusers or LDM). Pickle-based files are refused; text-encoder, Tucker, DoRA and
full-weight diff keys are skipped with a warning.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from . import naming as nm

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
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError):
        cfg = None
    if not isinstance(cfg, dict):
        raise ValueError("its lora_adapter_metadata is not a JSON table")
    return {k.removeprefix("unet."): v for k, v in cfg.items() if not k.startswith("text_encoder")}


def _peft_scale(cfg: Mapping[str, Any], raw_name: str, rank: int) -> float:
    alpha = cfg.get("lora_alpha")
    patterns = cfg.get("alpha_pattern") or {}
    for pattern, a in patterns.items() if isinstance(patterns, dict) else ():
        if raw_name == pattern or raw_name.endswith("." + pattern):
            alpha = a
    if alpha is None:
        return 1.0
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"lora_alpha of {raw_name!r} is {alpha!r}, not a finite number")
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _triggers(metadata: Mapping[str, str], top: int = 5) -> list[str]:
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        return [t.strip() for t in phrase.split(",") if t.strip()]
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except (ValueError, RecursionError):
        return []
    counts: dict[str, int] = {}
    for tags in freq.values() if isinstance(freq, dict) else ():
        for tag, n in tags.items() if isinstance(tags, dict) else ():
            if isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n):
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


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _pair(path: Path, name: str, g: Mapping[str, Any], peft: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """One module's (down r x n, up * scale m x r) in fp32; ValueError naming the file and module for a
    tensor of the wrong type or shape, rank 0, an alpha that is not one finite number, or NaN/Inf values."""
    where = f"{path.name}: module {name!r}"
    if "down" not in g or "up" not in g:
        raise ValueError(f"{where} lacks its lora_down or lora_up tensor")
    for role in ("down", "up", "alpha"):
        if role in g and g[role].dtype not in _FLOATS:
            raise ValueError(f"{where}: its {role} tensor has dtype {g[role].dtype}; a LoRA stores float tensors")
    down, up = g["down"].float(), g["up"].float()
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        raise ValueError(f"{where}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} are not 2-D or 4-D")
    r = down.shape[0]
    if r == 0 or down[0].numel() == 0 or up.shape[0] == 0:
        raise ValueError(f"{where} has rank 0 or an empty layer (shapes {tuple(down.shape)}, {tuple(up.shape)})")
    if up.ndim > 2 and any(s != 1 for s in up.shape[2:]):
        raise ValueError(f"{where} has a non-1x1 lora_up (unsupported adapter type)")
    down, up = down.reshape(r, -1), up.reshape(up.shape[0], -1)
    if up.shape[1] != r:
        raise ValueError(f"{where}: down/up ranks differ: {r} vs {up.shape[1]}")
    if "alpha" in g:
        if g["alpha"].numel() != 1:
            raise ValueError(f"{where}: alpha holds {g['alpha'].numel()} values; a LoRA's alpha is one number")
        alpha = float(g["alpha"].float().item())
        if not math.isfinite(alpha):
            raise ValueError(f"{where}: alpha is {alpha}; the file is damaged")
        scale = alpha / r if alpha else 1.0
    else:
        try:
            scale = _peft_scale(peft, g["raw"], r)
        except ValueError as e:
            raise ValueError(f"{path.name}: {e}") from None
    if not (bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())):
        raise ValueError(f"{where} holds NaN or infinite weights; the file is damaged")
    up = up * scale if scale != 1.0 else up
    if not bool(torch.isfinite(up).all()):
        raise ValueError(f"{where}: its weights overflow when scaled by alpha / rank = {scale:g}")
    return down.contiguous(), up.contiguous()


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
    try:
        peft = _peft_config(metadata)
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None
    factors = {name: _pair(path, name, g, peft) for name, g in groups.items()}
    return factors, metadata, _triggers(metadata)
