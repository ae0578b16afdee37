"""Writing LoRA files: kohya and PEFT state dicts of plain factors, with the metadata hosts show.

Everything here works on plain data: `factors` maps a module name to `(A, B)` with A = "lora_down"
(r x n) and B = "lora_up" (m x r), dW = B @ A. Files are safetensors only (no pickle), written atomically.
A kohya file stores alpha = r per module, so the scale alpha/r is 1 and the stored pair is dW exactly.
The reader is :mod:`.lora_read`; a bank's concepts go through :mod:`.bank_lora`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..files import atomic_write_bytes
from . import naming as nm

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
