"""Adapter layers: a frozen base layer plus low-rank paths y = f(x) + B (A x)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .targets import LayerSpec, set_module


def lowrank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, spec: LayerSpec, base: nn.Module) -> torch.Tensor:
    """B (A x) for a Linear, or the conv pair (A as the layer's kernel, B as a 1x1 conv)."""
    a = a.to(x.dtype)
    b = b.to(x.dtype)
    if spec.kind == "linear":
        return F.linear(F.linear(x, a), b)
    r = a.shape[0]
    kh, kw = spec.kernel
    h = F.conv2d(x, a.view(r, -1, kh, kw), None, base.stride, base.padding, base.dilation)
    return F.conv2d(h, b.view(b.shape[0], r, 1, 1))


class AdapterLayer(nn.Module):
    """Wraps a Linear/Conv2d: y = f(x) [+ B_i (A_i x) of a trainable group] [+ frozen bypass sum]."""

    def __init__(self, base: nn.Module, spec: LayerSpec):
        super().__init__()
        self.base = base
        self.spec = spec
        # trainable pair as (stacked A, stacked B, index) into a group of same-shaped layers
        self.train_view: tuple[torch.Tensor, torch.Tensor, int] | None = None
        # stacked bases (R x n) and up factors with strengths folded in (m x R) of composed concepts;
        # buffers, so they follow the model's .to(device)
        self.register_buffer("bypass_A", None, persistent=False)
        self.register_buffer("bypass_B", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``.weight`` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def trainable_pair(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of the trainable adapter, or None."""
        if self.train_view is None:
            return None
        a, b, i = self.train_view
        return a[i], b[i]

    def set_bypass(self, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Install (or clear with None) the frozen bypass pair."""
        if a is None or b is None:
            self.bypass_A = self.bypass_B = None
            return
        dev = self.base.weight.device
        self.bypass_A = a.detach().to(dev)
        self.bypass_B = b.detach().to(dev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.train_view is not None:
            a, b, i = self.train_view
            y = y + lowrank(x, a[i], b[i], self.spec, self.base)
        if self.bypass_A is not None:
            y = y + lowrank(x, self.bypass_A, self.bypass_B, self.spec, self.base)
        return y


def inject(model: nn.Module, specs: Iterable[LayerSpec]) -> dict[str, AdapterLayer]:
    """Wrap every listed layer in an AdapterLayer; returns them by name. Undo with :func:`remove`."""
    out: dict[str, AdapterLayer] = {}
    for spec in specs:
        module = model.get_submodule(spec.name)
        if isinstance(module, AdapterLayer):
            raise RuntimeError(f"layer {spec.name!r} already carries SeqLoRA adapters; remove them first")
        wrapper = AdapterLayer(module, spec)
        set_module(model, spec.name, wrapper)
        out[spec.name] = wrapper
    return out


def remove(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """Put the original layers back: the model is exactly as before :func:`inject`."""
    for name, wrapper in layers.items():
        if model.get_submodule(name) is wrapper:
            set_module(model, name, wrapper.base)
