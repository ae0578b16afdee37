"""The basis's projection onto the complement of earlier directions, through Q or through the complement."""

from __future__ import annotations

import torch

from seqlora_core.method import basis as bs


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen))[0]


def test_the_complement_projects_as_q_does_and_is_used_only_when_narrower() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 40
    qs = [_orthonormal(n, 30, gen), _orthonormal(n, 26, gen)]  # complements 10 and 14 wide, Q 30 wide
    stacked_q = torch.zeros(2, n, 30)
    stacked_q[0], stacked_q[1, :, :26] = qs[0], qs[1]
    c = bs.narrow_complement(qs, n)
    assert c is not None and c.shape == (2, n, 14)
    g = torch.randn(2, 4, n, generator=gen)
    via_c = bs.project_out(g, stacked_q, c)
    torch.testing.assert_close(via_c, bs.project_out(g, stacked_q), rtol=0, atol=1e-5)
    assert (via_c @ stacked_q).abs().max() < 1e-5  # nothing left along the earlier directions
    assert (g - via_c).abs().max() > 0.1  # and something was removed

    assert bs.narrow_complement([_orthonormal(n, 20, gen)], n) is None  # complement as wide as Q: use Q
    assert bs.narrow_complement([qs[0], None], n) is None  # a layer with nothing to avoid


def test_complement_basis_is_orthonormal_and_orthogonal_to_q() -> None:
    gen = torch.Generator().manual_seed(1)
    for n, k in ((12, 5), (12, 11), (12, 12)):
        q = _orthonormal(n, k, gen)
        c = bs.complement_basis(q, n)
        assert c.shape == (n, n - k) and c.dtype == torch.float64
        torch.testing.assert_close(c.T @ c, torch.eye(n - k, dtype=torch.float64), rtol=0, atol=1e-12)
        assert bool(((q.double().T @ c).abs() < 1e-6).all())
