"""The moment recorder: layers that read one tensor share its product, and only while it is unchanged."""

from __future__ import annotations

import torch
from torch import nn

from seqlora_core.method import stats
from seqlora_core.method.stats import MomentRecorder
from seqlora_core.method.targets import layer_spec


class Attention(nn.Module):
    """q, k and v read the same input; k2 and v2 read a context that k3, in a later block, reads again after
    five layers with inputs of their own."""

    def __init__(self, inplace_between: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.k2, self.v2, self.k3 = nn.Linear(5, 6), nn.Linear(5, 6), nn.Linear(5, 6)
        self.mlp = nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)])
        self.inplace_between = inplace_between

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        if self.inplace_between:
            x.mul_(3.0)  # the next reader sees other values
        h = q + self.k(x) + self.v(x)
        return self.mlp(h).sum() + (self.k2(context) + self.v2(context)).sum() + self.k3(context).sum()


def _moments(model: nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]], inference: bool, monkeypatch):
    """(moments, how many products were computed per forward pass)."""
    calls = {"n": 0}

    def counted(*args):
        calls["n"] += 1
        return rows_of(*args)

    rows_of = stats.layer_rows
    monkeypatch.setattr(stats, "layer_rows", counted)
    specs = [layer_spec(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with MomentRecorder(model, specs) as rec, torch.inference_mode(inference):
        for x, c in inputs:
            model(x.clone(), c)
    return rec.moments(), calls["n"] / len(inputs)


def _expected(rows: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.cat(rows)
    return stacked.T @ stacked / stacked.shape[0]


def test_shared_inputs_give_each_layer_its_own_exact_moment(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(7, 6, generator=gen), torch.randn(3, 5, generator=gen)) for _ in range(3)]
    for inference in (False, True):
        got, products = _moments(Attention(), inputs, inference, monkeypatch)
        assert products == 2 + 5, "one for x (q, k, v), one for the context (k2, v2, k3), one per mlp layer"
        for name in ("q", "k", "v"):
            assert torch.allclose(got[name], _expected([x for x, _ in inputs]), atol=1e-6), (name, inference)
        for name in ("k2", "v2", "k3"):
            assert torch.allclose(got[name], _expected([c for _, c in inputs]), atol=1e-6), (name, inference)


def test_an_input_changed_in_place_between_readers_is_measured_again(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(7, 6, generator=gen), torch.randn(3, 5, generator=gen)) for _ in range(2)]
    got, products = _moments(Attention(inplace_between=True), inputs, False, monkeypatch)
    assert products == 3 + 5
    assert torch.allclose(got["q"], _expected([x for x, _ in inputs]), atol=1e-6)
    assert torch.allclose(got["k"], _expected([3 * x for x, _ in inputs]), atol=1e-5)


def test_layers_with_equal_moments_share_one_sketch() -> None:
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(40, 12, generator=gen)
    context = rows.T @ rows / 40
    other = context + 0.01 * torch.eye(12)
    sketches = stats.sketches_from_moments({"k": context, "v": context.clone(), "q": other}, k_max=4, energy=1.0)
    assert sketches["k"] is sketches["v"] and sketches["q"] is not sketches["k"]
    for name, moment in (("k", context), ("q", other)):
        alone = stats.sketch_moment(moment, 4, 1.0)
        assert torch.allclose(sketches[name].s, alone.s) and sketches[name].trace == alone.trace
