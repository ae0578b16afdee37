"""Residual interference energy and its high-probability forgetting bound (docs/method.md, "Interference").

Every quantity reduces to r x r matrices: with K = A S A^T (the concept's basis seen through the other
concept's second moment S), R = E||B A x||^2 = tr(B K B^T), and the eigenvalues of C = S^1/2 dW^T dW S^1/2
are those of K^1/2 B^T B K^1/2.
"""

from __future__ import annotations

import math

import torch

from .stats import Sketch


def sketch_gram(a: torch.Tensor, sketch: Sketch, tail: str = "mean") -> torch.Tensor:
    """K = A S A^T (r x r) for S = U diag(s) U^T + tau (I - U U^T), tau the sketch's ``tail`` level."""
    a = a.double()
    au = a @ sketch.U.double()
    k = (au * sketch.s.double().clamp_min(0)) @ au.T
    tau = sketch.tail(tail)
    if tau > 0:
        k = k + tau * (a @ a.T - au @ au.T)
    return (k + k.T) / 2


def dense_gram(a: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """K = A S A^T (r x r) for a full n x n second moment S."""
    a = a.double()
    k = a @ moment.double() @ a.T
    return (k + k.T) / 2


def energy_of_gram(b: torch.Tensor, k: torch.Tensor) -> float:
    """R = tr(B K B^T)."""
    b = b.double()
    return float((b * (b @ k)).sum())


def energy(b: torch.Tensor, a: torch.Tensor, sketch: Sketch, tail: str = "mean") -> float:
    """R = E||B A x||^2 for inputs whose second moment the sketch (with its tail) stands for."""
    return energy_of_gram(b, sketch_gram(a, sketch, tail))


def bound_of_gram(b: torch.Tensor, k: torch.Tensor, delta: float = 0.05) -> float:
    """Laurent-Massart at probability 1 - delta, u = ln(1/delta): tr C + 2||C||_F sqrt(u) + 2||C||_op u,
    for Gaussian inputs with the second moment behind K."""
    evals, evecs = torch.linalg.eigh(k)
    half = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    b = b.double()
    c = half @ (b.T @ b) @ half
    lam = torch.linalg.eigvalsh((c + c.T) / 2).clamp_min(0)
    u = math.log(1.0 / delta)
    return float(lam.sum() + 2.0 * lam.pow(2).sum().sqrt() * math.sqrt(u) + 2.0 * lam.max() * u) if lam.numel() else 0.0


def forgetting_bound(b: torch.Tensor, a: torch.Tensor, sketch: Sketch, delta: float = 0.05, tail: str = "max") -> float:
    """The bound on ||B A x||^2 at probability 1 - delta for inputs x of the sketched concept.

    With the default ``tail="max"`` the sketch's model of S dominates the true moment (every left-out
    eigenvalue is at most min(s_k, trace - sum s)), so the bound holds for the measured moment's Gaussian.
    """
    return bound_of_gram(b, sketch_gram(a, sketch, tail), delta)
