"""The linear-layer world of docs/method.md: a learned basis beats a frozen one; bilevel beats joint on B.

The measured numbers are printed (run with ``-s``) so they can be quoted.
"""

from __future__ import annotations

import pytest

from seqlora_core import TrainConfig, build_report, train_concept
from seqlora_core.toy.linear_world import LinearWorld

pytestmark = pytest.mark.slow  # trains models end to end


def run(world: LinearWorld, method: str, steps: int = 200, budget: float = 0.05, **config) -> dict:
    model = world.model()
    bank = None
    for t in range(world.concepts):
        cfg = TrainConfig(
            name=f"c{t}", method=method, rank=4, steps=steps, lr=4e-2, targets="proj", budget=budget, **config
        )
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


def test_the_dual_step_drives_interference_towards_a_binding_budget():
    # each concept's target also moves the shared directions and the budget binds; without activation-space
    # protection (which would keep every basis out of the shared directions, so that the budget never binds);
    # sketches keep 99.99% of each moment's energy, so the left-out tail, which no basis avoids, stays far
    # below the budget
    world = LinearWorld(n=64, generic_dim=12, specific_dim=6, concepts=3, generic_leak=1.0, seed=0)
    settings = dict(steps=300, budget=5e-4, sketch_energy=0.9999, protect="off")
    dual = run(world, "seqlora", **settings)
    fixed = run(world, "seqlora", dual_lr=0.0, **settings)  # lambda stays 0: no penalty
    show("seqlora, eps=5e-4", dual)
    show("seqlora, lambda = 0", fixed)
    later = slice(1, None)  # concept 0 has only the prior to keep away from
    assert max(dual["train_interference"][later]) <= 2 * 5e-4, dual["train_interference"]
    assert max(dual["train_interference"][later]) <= 0.5 * min(fixed["train_interference"][later])
    assert dual["drift"] < fixed["drift"]
    assert dual["fit"] <= 1.1 * fixed["fit"], "the basis moves out of the way without learning less"
