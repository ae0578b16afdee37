"""A linear-layer world where interference can be measured exactly (docs/method.md, "Why the basis is learned").

Concept t's inputs are a shared generic part plus a concept-specific part, x = G g + C_t c; its target
changes the layer only along its own specific directions, y = (W0 + D_t) x with D_t = D~ C_t C_t^T.
The base model's own (trigger-free) inputs are the generic part alone. A good method learns each concept
without disturbing the others or the base: that is measurable here in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class OneLayer(nn.Module):
    """The model: a single Linear named ``proj``."""

    def __init__(self, w0: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class LinearWorld:
    """Generic and concept-specific input subspaces, and each concept's target change."""

    n: int = 64
    generic_dim: int = 12
    specific_dim: int = 6
    concepts: int = 6
    generic_scale: float = 1.0
    specific_scale: float = 1.0
    target_scale: float = 1.0
    generic_leak: float = 0.0  # how much each concept's target also changes the shared generic directions
    batch: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        need = self.generic_dim + self.concepts * self.specific_dim
        if need > self.n:
            raise ValueError(f"n={self.n} is too small for {need} input directions")
        g = torch.Generator().manual_seed(self.seed)
        basis, _ = torch.linalg.qr(torch.randn(self.n, self.n, generator=g))
        self.G = basis[:, : self.generic_dim]
        self.C = [
            basis[:, self.generic_dim + t * self.specific_dim : self.generic_dim + (t + 1) * self.specific_dim]
            for t in range(self.concepts)
        ]
        self.W0 = torch.randn(self.n, self.n, generator=g) / self.n**0.5
        self.D = []
        for c in self.C:
            d = (torch.randn(self.n, self.specific_dim, generator=g) / self.specific_dim**0.5) @ c.T
            leak = (torch.randn(self.n, self.generic_dim, generator=g) / self.generic_dim**0.5) @ self.G.T
            self.D.append(self.target_scale * (d + self.generic_leak * leak))

    def model(self) -> OneLayer:
        return OneLayer(self.W0)

    def inputs(self, t: int | None, gen: torch.Generator, batch: int | None = None) -> torch.Tensor:
        """Inputs of concept t (or of the base, t=None)."""
        b = batch or self.batch
        x = self.generic_scale * torch.randn(b, self.generic_dim, generator=gen) @ self.G.T
        if t is not None:
            x = x + self.specific_scale * torch.randn(b, self.specific_dim, generator=gen) @ self.C[t].T
        return x

    def batches(self, t: int | None):
        """step -> (x, y) for concept t; a pure function of the step."""

        def fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            gen = torch.Generator().manual_seed(hash((self.seed, -1 if t is None else t, step)) % 2**62)
            x = self.inputs(t, gen)
            w = self.W0 if t is None else self.W0 + self.D[t]
            return x, x @ w.T

        return fn

    @staticmethod
    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return (model(x) - y).pow(2).mean()

    # ---- exact metrics of a composed weight ---------------------------------------------------
    def moment(self, t: int | None) -> torch.Tensor:
        """E[x x^T] of concept t's inputs (or the base's)."""
        s = self.generic_scale**2 * self.G @ self.G.T
        if t is not None:
            s = s + self.specific_scale**2 * self.C[t] @ self.C[t].T
        return s

    def error(self, delta: torch.Tensor, t: int) -> float:
        """E||(W0 + delta) x - y_t||^2 / E||D_t x||^2 for concept t: 0 is a perfect fit, 1 is no learning."""
        s = self.moment(t)
        e = delta - self.D[t]
        return float(torch.trace(e @ s @ e.T) / torch.trace(self.D[t] @ s @ self.D[t].T))

    def drift(self, delta: torch.Tensor) -> float:
        """E||delta x||^2 / E||W0 x||^2 on the base's inputs: how far the base model moved."""
        s = self.moment(None)
        return float(torch.trace(delta @ s @ delta.T) / torch.trace(self.W0 @ s @ self.W0.T))
