"""The final statistics of a long enough training come from its last steps' forward passes (adapter
active) instead of a pass of their own: the same moment up to the adapter's last few updates, one pass of
``stats_batches`` forwards cheaper. Short trainings and runs resumed inside that window keep the pass."""

from __future__ import annotations

import pytest
import torch

from seqlora_core import TrainCallbacks, TrainConfig, TrainingCancelled, train_concept
from seqlora_core.method import trainer
from tests._unet import ToyConcept, denoise_loss, tiny_unet

torch.set_num_threads(1)
K = 2  # stats_batches


def _counting(loss_fn):
    calls = {"n": 0}

    def wrapped(model, batch):
        calls["n"] += 1
        return loss_fn(model, batch)

    return wrapped, calls


def _config(steps: int, **kw) -> TrainConfig:
    return TrainConfig(name="c0", triggers=["tok0"], rank=4, steps=steps, lr=1e-3, stats_batches=K, **kw)


@pytest.mark.parametrize(
    ("steps", "in_steps"),
    [(K * trainer.FINAL_STATS_IN_STEPS_MIN, True), (K * trainer.FINAL_STATS_IN_STEPS_MIN - 1, False)],
)
def test_long_trainings_record_the_final_statistics_in_their_last_steps(steps: int, in_steps: bool) -> None:
    unet, c = tiny_unet(), ToyConcept(0)
    loss, calls = _counting(denoise_loss)
    bank = train_concept(unet, loss, c.batches(), _config(steps), None, prior_batches=c.batches(prior=True))
    # prior pass + concept pass + the steps (+ a final pass only for short trainings)
    assert calls["n"] == K + K + steps + (0 if in_steps else K)
    assert ("final_stats_in_steps" in bank.concepts[0].timings) is in_steps


def test_recorded_statistics_agree_with_a_separate_pass() -> None:
    """The last steps' moment and a separate pass with the final adapter estimate the same E[x x^T]: the
    trained adapter's own energy on them (what later concepts' penalties and the report read), their traces
    and top eigenvalues agree to a few percent (measured here: 0.1% for the energy)."""
    k, steps = 8, 8 * trainer.FINAL_STATS_IN_STEPS_MIN
    c = ToyConcept(1)

    def config() -> TrainConfig:
        return TrainConfig(name="c0", triggers=["tok0"], rank=4, steps=steps, lr=1e-3, stats_batches=k)

    got = train_concept(tiny_unet(), denoise_loss, c.batches(), config(), None, c.batches(prior=True))
    old = trainer.FINAL_STATS_IN_STEPS_MIN
    trainer.FINAL_STATS_IN_STEPS_MIN = 10**6  # force the separate pass
    try:
        want = train_concept(tiny_unet(), denoise_loss, c.batches(), config(), None, c.batches(prior=True))
    finally:
        trainer.FINAL_STATS_IN_STEPS_MIN = old
    assert "final_stats_in_steps" in got.concepts[0].timings
    assert "final_stats_in_steps" not in want.concepts[0].timings
    e_got, e_want = got.concepts[0].info["self_energy"], want.concepts[0].info["self_energy"]
    assert e_want > 0 and abs(e_got - e_want) <= 0.05 * e_want, (e_got, e_want)
    for spec in got.layers:
        a, b = got.concepts[0].layers[spec.name], want.concepts[0].layers[spec.name]
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B), "training itself is unchanged"
        assert abs(a.sketch.trace - b.sketch.trace) <= 0.15 * b.sketch.trace, spec.name
        assert abs(float(a.sketch.s[0] - b.sketch.s[0])) <= 0.15 * float(b.sketch.s[0]), spec.name


def test_a_run_resumed_inside_the_window_measures_in_a_separate_pass(tmp_path) -> None:
    steps = K * trainer.FINAL_STATS_IN_STEPS_MIN
    c = ToyConcept(2)
    cfg = _config(steps, checkpoint_path=str(tmp_path / "c.ckpt"), checkpoint_every=1000)
    stop_at = steps - 1
    seen = {"n": 0}

    def should_stop() -> bool:
        return seen["n"] >= stop_at

    def on_step(info) -> None:
        seen["n"] = info.step

    unet = tiny_unet()
    with pytest.raises(TrainingCancelled):
        train_concept(
            unet, denoise_loss, c.batches(), cfg, None, c.batches(prior=True), TrainCallbacks(on_step, should_stop)
        )
    loss, calls = _counting(denoise_loss)
    bank = train_concept(unet, loss, c.batches(), cfg, None, c.batches(prior=True))
    assert "final_stats_in_steps" not in bank.concepts[0].timings
    assert calls["n"] == K + K + 1 + K  # prior, concept, the one step left, the final pass


def test_mixed_runs_record_the_steps_that_ran_with_the_earlier_concepts_on() -> None:
    cfg = _config(K * trainer.FINAL_STATS_IN_STEPS_MIN, seed=3)
    window = trainer._final_stats_window(cfg, 0, mixed=True)
    assert window is not None and len(window) == K
    assert all(trainer._coin(cfg.seed, s) for s in window)
    later = [s for s in range(min(window), cfg.steps) if trainer._coin(cfg.seed, s)]
    assert sorted(window) == later, "the last K such steps, none skipped"
    assert trainer._final_stats_window(cfg, min(window) + 1, mixed=True) is None


def test_a_mixed_second_concept_needs_no_final_pass_and_agrees_with_one() -> None:
    k, steps = 4, 4 * trainer.FINAL_STATS_IN_STEPS_MIN
    first, second = ToyConcept(0), ToyConcept(1)

    def cfg(name: str, trigger: str) -> TrainConfig:
        return TrainConfig(
            name=name, triggers=[trigger], rank=4, steps=steps, lr=1e-3, stats_batches=k, context="mixed"
        )

    bank = train_concept(tiny_unet(), denoise_loss, first.batches(), cfg("c0", "tok0"), None, first.batches(prior=True))

    def second_bank(force_pass: bool):
        loss, calls = _counting(denoise_loss)
        old = trainer.FINAL_STATS_IN_STEPS_MIN
        if force_pass:
            trainer.FINAL_STATS_IN_STEPS_MIN = 10**6
        try:
            return train_concept(tiny_unet(), loss, second.batches(), cfg("c1", "tok1"), bank), calls["n"]
        finally:
            trainer.FINAL_STATS_IN_STEPS_MIN = old

    got, n_got = second_bank(False)
    want, n_want = second_bank(True)
    assert "final_stats_in_steps" in got.concepts[1].timings
    assert n_got == k + steps and n_want == k + steps + k  # concept pass + steps (+ the final pass)
    for spec in got.layers:
        a, b = got.concepts[1].layers[spec.name], want.concepts[1].layers[spec.name]
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B), "training itself is unchanged"
        assert abs(a.sketch.trace - b.sketch.trace) <= 0.15 * b.sketch.trace, spec.name
