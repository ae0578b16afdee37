"""Layers of a host's UNet by the shape of their weights (Forge's ``Linear`` is not a ``torch.nn.Linear``).

The core's ``find_targets`` and ``ConceptBank.check_model`` accept ``nn.Linear``/``nn.Conv2d`` only. Forge
builds its UNet from its own operation classes (a ``Linear`` that is a plain ``nn.Module`` with a 2-D
``weight``), so the web UI finds layers and checks banks by weight shape: the same result on A1111's LDM
modules, and a usable one on Forge's.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import torch
from torch import nn

from ._core import BankMismatchError, ConceptBank, LayerSpec, layer_spec, resolve_patterns


def weight_spec(name: str, module: nn.Module) -> LayerSpec | None:
    """The LoRA shape of a module that has a Linear- or Conv2d-shaped weight (None otherwise)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        try:
            return layer_spec(name, module)
        except ValueError:
            return None
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or getattr(module, "groups", 1) != 1:
        return None
    if w.ndim == 2:
        return LayerSpec(name, "linear", int(w.shape[0]), int(w.shape[1]))
    if w.ndim == 4:
        return LayerSpec(
            name,
            "conv2d",
            int(w.shape[0]),
            int(w.shape[1] * w.shape[2] * w.shape[3]),
            (int(w.shape[2]), int(w.shape[3])),
        )
    return None


def _compile(patterns: tuple[str, ...]) -> list[re.Pattern[str]]:
    return [re.compile(p[3:]) if p.startswith("re:") else re.compile(fnmatch.translate(p)) for p in patterns]


def find_layers(model: nn.Module, targets: str = "attn") -> list[LayerSpec]:
    """The layers of `model` whose names match `targets` (a preset or patterns), in module order."""
    compiled = _compile(resolve_patterns(targets))
    found = []
    for name, module in model.named_modules():
        if name and any(rx.fullmatch(name) for rx in compiled):
            spec = weight_spec(name, module)
            if spec is not None:
                found.append(spec)
    if not found:
        raise ValueError(f"targets {targets!r} match no layer with a weight in {type(model).__name__}")
    return found


def check_fits(bank: ConceptBank, model: Any) -> None:
    """BankMismatchError naming the layers `model` lacks or shapes differently (what ``check_model`` says)."""
    problems = []
    for spec in bank.layers:
        try:
            module = model.get_submodule(spec.name)
        except AttributeError:
            problems.append(f"{spec.name}: missing")
            continue
        have = weight_spec(spec.name, getattr(module, "base", module))
        if have is None:
            problems.append(f"{spec.name}: no Linear/Conv2d weight")
        elif have != spec:
            problems.append(
                f"{spec.name}: bank {spec.out_features}x{spec.in_features}, "
                f"model {have.out_features}x{have.in_features}"
            )
    if problems:
        raise BankMismatchError(
            f"this bank ({bank.architecture}, {bank.layer_naming} names) does not fit the loaded checkpoint: "
            f"{len(problems)} of {len(bank.layers)} layers differ: "
            + "; ".join(problems[:5])
            + ("; ..." if len(problems) > 5 else "")
            + ". Load the checkpoint the bank was trained on."
        )
