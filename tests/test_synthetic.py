"""The linear-layer world of docs/method.md: a learned basis beats a frozen one; bilevel beats joint on B.

The measured numbers are printed (run with ``-s``) so they can be quoted.
"""

from __future__ import annotations

import pytest
import torch

from seqlora_core import TrainConfig, build_report, train_concept
from seqlora_core.toy.linear_world import LinearWorld

pytestmark = pytest.mark.slow  # trains models end to end


def run(world: LinearWorld, method: str, steps: int = 200, budget: float = 0.05) -> dict:
    model = world.model()
    bank = None
    for t in range(world.concepts):
        cfg = TrainConfig(name=f"c{t}", method=method, rank=4, steps=steps, lr=2e-2, targets="proj", budget=budget)
        bank = train_concept(model, world.loss, world.batches(t), cfg, bank, prior_batches=world.batches(None))
    deltas = [c.delta("proj") for c in bank.concepts]
    total = sum(deltas)
    return {
        "interference": build_report(bank)["mean_relative_interference"],
        "train_interference": [c.info["final_relative_interference"] for c in bank.concepts],
        "drift": world.drift(total),
        "fit": sum(world.error(d, t) for t, d in enumerate(deltas)) / len(deltas),
        "composed": sum(world.error(total, t) for t in range(len(deltas))) / len(deltas),
        "B_norm": sum(float(c.layers["proj"].B.norm()) for c in bank.concepts) / len(deltas),
    }


def show(tag: str, r: dict) -> None:
    print(
        f"\n{tag:28s} interference {r['interference']:.4f}  drift {r['drift']:.4f}  fit error {r['fit']:.3f}  "
        f"composed error {r['composed']:.3f}  mean ||B|| {r['B_norm']:.3f}"
    )


@pytest.fixture(scope="module")
def learned_vs_frozen():
    world = LinearWorld(n=64, generic_dim=12, specific_dim=6, concepts=5, seed=0)
    return run(world, "seqlora"), run(world, "ortho_frozen")


def test_learned_basis_interferes_less_than_frozen_slots(learned_vs_frozen):
    ours, frozen = learned_vs_frozen
    show("seqlora", ours)
    show("ortho_frozen", frozen)
    assert ours["interference"] <= 0.5 * frozen["interference"], (ours["interference"], frozen["interference"])
    assert ours["drift"] < frozen["drift"]
    assert ours["fit"] <= 1.1 * frozen["fit"], "comparable (or better) fit of each concept"
    assert ours["composed"] < frozen["composed"]


def test_bilevel_keeps_b_where_joint_shrinks_it():
    # each concept's target also moves the shared directions, and the budget binds (lambda > 0)
    world = LinearWorld(n=64, generic_dim=12, specific_dim=6, concepts=4, generic_leak=1.0, seed=0)
    bilevel = run(world, "seqlora", steps=300, budget=5e-4)
    joint = run(world, "joint", steps=300, budget=5e-4)
    show("seqlora (bilevel), eps=5e-4", bilevel)
    show("joint (single level)", joint)
    for r in (bilevel, joint):  # both end at the budget: the same interference
        assert all(x <= 2 * 5e-4 for x in r["train_interference"]), r["train_interference"]
    assert joint["B_norm"] < bilevel["B_norm"], "single-level pays for the budget by shrinking B"
    assert joint["fit"] >= bilevel["fit"] - 0.01, "and learns no better for it"
    assert torch.isfinite(torch.tensor(joint["B_norm"]))
