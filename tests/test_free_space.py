"""The free space of a new basis: the low-rank path (sketches plus their tails) against the dense one."""

from __future__ import annotations

import pytest
import torch

from seqlora_core.method import basis as bs


def _moment(n: int, ranks: list[int], seed: int) -> bs.LowRankMoment:
    """Earlier sketches with distinct eigenvalues and small tails, as the trainer stacks them."""
    g = torch.Generator().manual_seed(seed)
    us, ds, c = [], [], 0.0
    for k in ranks:
        u = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
        s = torch.sort(torch.rand(k, generator=g, dtype=torch.float64) * 10 + 0.5, descending=True)[0]
        tau = 0.01 * float(torch.rand(1, generator=g))
        us.append(u)
        ds.append(s - tau)
        c += tau
    return bs.LowRankMoment(torch.cat(us, 1), torch.cat(ds), c)


@pytest.mark.parametrize(
    ("n", "ranks", "k_prev", "theta"), [(200, [24], 0, 0.9), (256, [24, 8, 16], 8, 0.9), (64, [5], 4, None)]
)
def test_the_low_rank_free_space_is_the_dense_one(n, ranks, k_prev, theta):
    s_old = _moment(n, ranks, seed=n)
    q = bs.span_basis([torch.randn(k_prev, n, generator=torch.Generator().manual_seed(1))], n) if k_prev else None
    dense = bs.free_space(s_old.dense(), q, 4, theta)
    low = bs.free_space(s_old, q, 4, theta)

    assert low.z.shape == dense.z.shape and low.protected.shape == dense.protected.shape
    assert low.protection == pytest.approx(dense.protection) if theta else low.protection is None
    assert torch.allclose(low.evals, dense.evals, atol=1e-10)
    if q is not None:  # the free space and the protected directions stay out of the earlier bases
        assert (q.double().T @ low.z).abs().max() < 1e-6
        assert low.protected.numel() == 0 or (q.double().T @ low.protected).abs().max() < 1e-6
    assert torch.allclose(low.z.T @ low.z, torch.eye(low.z.shape[1], dtype=low.z.dtype), atol=1e-10)
    p_low, p_dense = low.protected @ low.protected.T, dense.protected @ dense.protected.T
    assert torch.allclose(p_low, p_dense, atol=1e-8)

    f_new = torch.randn(n, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    delta = 1e-2 * s_old.trace() / n
    a_dense = bs.generalized_eigen_basis(f_new, dense, 4, delta).double()
    a_low = bs.generalized_eigen_basis(f_new, low, 4, delta).double()
    assert torch.linalg.svdvals(a_dense @ a_low.T).min() > 1 - 1e-6  # the same 4-dim span


def test_a_low_rank_moment_knows_its_trace_and_grows_by_plus():
    s_old = _moment(50, [6, 3], seed=3)
    assert s_old.trace() == pytest.approx(float(torch.trace(s_old.dense())))
    extra = torch.linalg.qr(torch.randn(50, 2, dtype=torch.float64))[0]
    grown = s_old.plus(extra, 2.5)
    assert torch.allclose(grown.dense(), s_old.dense() + 2.5 * extra @ extra.T)


def test_nothing_earlier_leaves_the_whole_layer_free():
    empty = torch.zeros(32, 0, dtype=torch.float64)
    space = bs.free_space(bs.LowRankMoment(empty, empty[0]), None, 4, 0.9)
    assert space.z.shape == (32, 32) and space.protected.shape == (32, 0)
    assert space.protection == {"protected": 0, "energy": 0.0, "free": 32}
