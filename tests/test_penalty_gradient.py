"""The penalty's closed-form gradients (the upper level uses them instead of autograd) against autograd."""

from __future__ import annotations

import pytest
import torch

from seqlora_core.method.methods import get_method
from seqlora_core.method.trainer import Group, Moment, _Run


def _moment(g: int, n: int, k: int, tau: float, gen: torch.Generator) -> Moment:
    u = torch.linalg.qr(torch.randn(g, n, k, generator=gen, dtype=torch.float64))[0]
    u[:, :, -1] = 0  # a zero-padded column, as stacked layers of different sketch ranks have
    root = torch.rand(g, 1, k, generator=gen, dtype=torch.float64) * 3
    root[:, :, -1] = 0
    return Moment(u, root, torch.full((g,), tau, dtype=torch.float64))


@pytest.mark.parametrize("tau", [0.0, 0.37])
def test_closed_form_gradients_equal_autograd(tau: float) -> None:
    gen = torch.Generator().manual_seed(0)
    g, m, r, n, k = 3, 7, 4, 12, 5
    moment = _moment(g, n, k, tau, gen)
    a = torch.linalg.qr(torch.randn(g, n, r, generator=gen, dtype=torch.float64))[0].mT.requires_grad_(True)
    b = torch.randn(g, m, r, generator=gen, dtype=torch.float64).requires_grad_(True)
    energy = moment.energy(a, b)
    grad_a, grad_b = torch.autograd.grad(energy.sum(), (a, b))
    with torch.no_grad():
        closed, closed_a, closed_b = moment.energy_and_gradients(a, b, with_b=True)
        _, _, none_b = moment.energy_and_gradients(a, b, with_b=False)
    torch.testing.assert_close(closed, energy.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(closed_a, grad_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(closed_b, grad_b, rtol=1e-10, atol=1e-12)
    assert none_b is None
    assert closed_a.abs().max() > 1e-3 and closed_b.abs().max() > 1e-3  # not a vacuous comparison of zeros


@pytest.mark.parametrize("method", ["seqlora", "joint"])
def test_upper_level_penalty_step_is_the_gradient_of_the_ratio(method: str) -> None:
    """What the trainer steps along is d(R_old / R_self)/dA (and, for `joint`, lambda times its B part)."""
    gen = torch.Generator().manual_seed(1)
    g, m, r, n, k = 2, 6, 3, 10, 4
    old, own = _moment(g, n, k, 0.05, gen), _moment(g, n, k, 0.0, gen)
    a = torch.linalg.qr(torch.randn(g, n, r, generator=gen, dtype=torch.float64))[0].mT.contiguous()
    b = torch.randn(g, m, r, generator=gen, dtype=torch.float64)
    lam = torch.tensor([0.5, 2.0], dtype=torch.float64)
    group = Group([], a, b, None, old, own, [False] * g, lam, [None] * g)
    group.B.grad = torch.zeros_like(b)
    run = object.__new__(_Run)
    run.method = get_method(method)
    run._interference_acc = [torch.zeros((), dtype=torch.float64)] * 2

    a_ = a.clone().requires_grad_(True)
    b_ = b.clone().requires_grad_(True)
    rel = old.energy(a_, b_) / (own.energy(a_, b_) + 1e-30)
    want_a = torch.autograd.grad(rel.sum(), a_, retain_graph=True)[0]
    want_b = torch.autograd.grad((lam * rel).sum(), b_)[0]
    with torch.no_grad():
        grad_a, _size = run._penalty_gradients(group)
    torch.testing.assert_close(grad_a, want_a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(group.last_rel, rel.detach(), rtol=1e-12, atol=0)
    expected_b = want_b if method == "joint" else torch.zeros_like(b)
    torch.testing.assert_close(group.B.grad, expected_b, rtol=1e-9, atol=1e-12)
