"""Orthogonal Adaptation's frozen basis (the ``ortho_frozen`` baseline): disjoint slots of one seeded
random orthonormal basis, assigned to concepts in order and never trained."""

from __future__ import annotations

import torch

from ..method.basis import orthonormal_rows


def random_orthonormal(n: int, seed: int) -> torch.Tensor:
    """A seeded random orthonormal n x n basis (rows), the same for a given (n, seed)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
    return orthonormal_rows(torch.randn(n, n, generator=gen, dtype=torch.float64)).float()


def frozen_slot(n: int, r: int, slot: int, seed: int) -> tuple[torch.Tensor, bool]:
    """Orthogonal Adaptation's basis: rows [slot*r, (slot+1)*r) of one seeded basis; wraps when full.

    Returns (A, wrapped): ``wrapped`` says the slots ran out and the basis reuses directions.
    """
    basis = random_orthonormal(n, seed)
    slots = n // r
    wrapped = slot >= slots
    i = slot % slots
    return basis[i * r : (i + 1) * r].contiguous(), wrapped
