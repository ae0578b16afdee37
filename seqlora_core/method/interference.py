"""Residual interference energy and its high-probability forgetting bound (docs/method.md, "Interference")."""

from __future__ import annotations

import math

import torch


def energy(b: torch.Tensor, a: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """R = E||dW x||^2 = ||B A F||_F^2 for inputs with second moment F F^T (differentiable)."""
    return (b @ (a @ factor)).pow(2).sum()


def forgetting_bound(b: torch.Tensor, a: torch.Tensor, factor: torch.Tensor, delta: float = 0.05) -> float:
    """Laurent-Massart: P(||dW x||^2 >= tr C + 2||C||_F sqrt(u) + 2||C||_op u) <= delta, u = ln(1/delta).

    C = M^T M with M = dW F, for Gaussian inputs x = F z.
    """
    m = b.double() @ (a.double() @ factor.double())
    c = m.T @ m
    u = math.log(1.0 / delta)
    tr = float(torch.trace(c))
    fro = float(torch.linalg.matrix_norm(c))
    op = float(torch.linalg.eigvalsh(c)[-1]) if c.numel() else 0.0
    return tr + 2.0 * fro * math.sqrt(u) + 2.0 * max(op, 0.0) * u
