"""The engine on a real (tiny) diffusers UNet: orthogonality, composition, undo, capacity, resume."""

from __future__ import annotations

import pytest
import torch

from seqlora_core import (
    ConceptBank,
    TrainCallbacks,
    TrainConfig,
    TrainingCancelled,
    build_report,
    compose,
    find_targets,
    train_concept,
)
from seqlora_core.method.adapters import AdapterLayer
from seqlora_core.method.trainer import discard_checkpoint
from tests._unet import ToyConcept, denoise_loss, tiny_unet


def _train(unet, bank, cid, method="seqlora", steps=6, **kw):
    c = ToyConcept(cid)
    cfg = TrainConfig(
        name=f"c{cid}", triggers=[f"tok{cid}"], method=method, rank=4, steps=steps, lr=1e-3, stats_batches=2, **kw
    )
    return train_concept(unet, denoise_loss, c.batches(), cfg, bank, prior_batches=c.batches(prior=True))


@pytest.fixture(scope="module")
def four_concepts():
    unet = tiny_unet()
    bank = None
    for cid in range(4):
        bank = _train(unet, bank, cid)
    return unet, bank


def _probe(unet):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 6, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=text).sample


def test_four_concepts_are_mutually_orthogonal(four_concepts):
    _, bank = four_concepts
    worst_cross = worst_self = 0.0
    for spec in bank.layers:
        a = [c.layers[spec.name].A.double() for c in bank.concepts]
        assert not any(c.layers[spec.name].soft for c in bank.concepts), "tiny UNet layers have capacity for 16"
        for i in range(4):
            eye = torch.eye(a[i].shape[0], dtype=torch.float64)
            worst_self = max(worst_self, float((a[i] @ a[i].T - eye).norm()))
            for j in range(4):
                if i != j:
                    worst_cross = max(worst_cross, float((a[i] @ a[j].T).abs().max()))
    assert worst_cross <= 1e-4, f"max |A_i A_j^T| = {worst_cross:.2e}"
    assert worst_self <= 1e-4, f"max ||A_i A_i^T - I|| = {worst_self:.2e}"


def test_training_moves_b_and_leaves_model_untouched():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    bank = _train(unet, None, 0)
    after = unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "training must restore the model exactly"
    assert not any(isinstance(m, AdapterLayer) for m in unet.modules())
    c = bank.concepts[0]
    assert all(float(cl.B.abs().max()) > 0 for cl in c.layers.values()), "every up factor learned something"
    assert len(c.loss_curve) == 6 and all(torch.isfinite(torch.tensor(c.loss_curve)))


@pytest.mark.parametrize("mode", ["merged", "bypass"])
def test_composition_applies_and_removes_exactly(four_concepts, mode):
    unet, bank = four_concepts
    base = _probe(unet)
    with compose(unet, bank, {"c0": 1.0, "c2": 0.7}, mode=mode):
        out = _probe(unet)
    assert not torch.allclose(out, base), "composition must change the output"
    assert torch.equal(_probe(unet), base), "remove() must restore the base output bit for bit"


def test_merged_and_bypass_agree(four_concepts):
    unet, bank = four_concepts
    sel = {"c0": 1.0, "c1": -0.5, "c3": 1.3}
    with compose(unet, bank, sel, mode="merged"):
        merged = _probe(unet)
    with compose(unet, bank, sel, mode="bypass"):
        bypass = _probe(unet)
    err = float((merged - bypass).abs().max())
    assert err <= 1e-5, f"merged vs bypass max abs difference {err:.2e} (tolerance 1e-5, fp32)"


def test_unknown_concept_is_a_clear_error(four_concepts):
    unet, bank = four_concepts
    with pytest.raises(KeyError, match="it has: c0, c1, c2, c3"):
        compose(unet, bank, {"nope": 1.0})


def test_report_shape_and_capacity(four_concepts):
    _, bank = four_concepts
    rep = build_report(bank)
    assert rep["concepts"] == ["c0", "c1", "c2", "c3"]
    assert len(rep["interference"]) == 4 and all(len(r) == 4 for r in rep["interference"])
    assert all(abs(rep["interference"][t][t] - 1.0) < 1e-9 for t in range(4))
    for t in range(4):
        for j in range(4):
            assert rep["bound_raw"][t][j] >= rep["interference_raw"][t][j], "the bound exceeds its mean"
    cap = rep["capacity"]
    assert set(cap) == {s.name for s in bank.layers}
    assert all(v["used"] == 16 and v["soft"] == [] for v in cap.values())


def test_full_layer_turns_soft_and_says_so():
    unet = tiny_unet()
    bank = None
    # cross-attention k/v read the 32-wide text: 32 / rank 16 = 2 concepts fit, the third does not
    for cid in range(3):
        c = ToyConcept(cid)
        cfg = TrainConfig(name=f"c{cid}", rank=16, steps=2, lr=1e-3, stats_batches=1, targets="cross_kv")
        bank = train_concept(unet, denoise_loss, c.batches(), cfg, bank, prior_batches=c.batches(prior=True))
    third = bank.concepts[2]
    assert third.info["soft_layers"], "the third concept must report the layers where capacity ran out"
    assert all(third.layers[n].soft for n in third.info["soft_layers"])
    cap = build_report(bank)["capacity"]
    assert all(v["soft"] == ["c2"] and v["used"] == 32 for v in cap.values())


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_bank(tmp_path):
    ck = str(tmp_path / "c0.partial.safetensors")
    unet = tiny_unet()
    ref = _train(unet, None, 0, steps=8)
    calls = {"n": 0}

    def stop_after_five() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(TrainingCancelled, match="step 5"):
        c = ToyConcept(0)
        cfg = TrainConfig(
            name="c0",
            triggers=["tok0"],
            rank=4,
            steps=8,
            lr=1e-3,
            stats_batches=2,
            checkpoint_path=ck,
            checkpoint_every=100,
        )
        train_concept(
            unet,
            denoise_loss,
            c.batches(),
            cfg,
            None,
            c.batches(prior=True),
            TrainCallbacks(should_stop=stop_after_five),
        )
    resumed = train_concept(unet, denoise_loss, c.batches(), cfg, None, c.batches(prior=True))
    for name, cl in ref.concepts[0].layers.items():
        other = resumed.concepts[0].layers[name]
        assert torch.equal(cl.A, other.A) and torch.equal(cl.B, other.B), name
    assert ref.concepts[0].loss_curve == resumed.concepts[0].loss_curve
    assert (tmp_path / "c0.partial.safetensors").exists(), "the checkpoint stays until the caller has saved the bank"
    discard_checkpoint(cfg)
    assert not (tmp_path / "c0.partial.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "sequential", "ortho_frozen", "joint", "fusion"])
def test_baselines_train_and_compose(method):
    unet = tiny_unet()
    bank = None
    for cid in range(2):
        bank = _train(unet, bank, cid, method=method, steps=3)
    assert [c.method for c in bank.concepts] == [method, method]
    base = _probe(unet)
    with compose(unet, bank, None, "merged"):
        assert not torch.allclose(_probe(unet), base)
    assert torch.equal(_probe(unet), base)
    if method == "ortho_frozen":
        a0 = bank.concepts[0].layers[bank.layers[0].name].A
        a1 = bank.concepts[1].layers[bank.layers[0].name].A
        assert float((a0 @ a1.T).abs().max()) < 1e-5, "disjoint slots of one orthonormal basis"
    if method == "fusion":
        assert all(cl.moment is not None for cl in bank.concepts[0].layers.values())


def test_targets_presets_and_patterns():
    unet = tiny_unet()
    attn = find_targets(unet, "attn")
    assert attn and all(s.name.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for s in attn)
    kv = find_targets(unet, "cross_kv")
    assert kv and all(".attn2.to_k" in s.name or ".attn2.to_v" in s.name for s in kv)
    convs = find_targets(unet, "*proj_in")
    assert convs and {s.kind for s in convs} <= {"linear", "conv2d"}
    with pytest.raises(ValueError, match="match no Linear or Conv2d"):
        find_targets(unet, "*.does_not_exist")


def test_conv_layers_train_and_compose():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 3, 6, 6, generator=g)) for _ in range(3)]

    def loss(m, b):
        return (m(b[0]) - b[1]).pow(2).mean()

    bank = None
    for i in range(2):
        cfg = TrainConfig(name=f"k{i}", rank=2, steps=4, lr=1e-2, targets="0,2", stats_batches=2)
        bank = train_concept(net, loss, lambda s, i=i: data[(s + i) % 3], cfg, bank)
    assert {s.kind for s in bank.layers} == {"conv2d"} and bank.layers[0].in_features == 27
    x = data[0][0]
    with torch.no_grad():
        with compose(net, bank, None, "merged"):
            merged = net(x)
        with compose(net, bank, None, "bypass"):
            bypass = net(x)
    assert float((merged - bypass).abs().max()) < 1e-5


def test_bank_from_other_model_is_rejected(four_concepts):
    _, bank = four_concepts
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(Exception, match="does not fit the model"):
        compose(other, bank)
    assert isinstance(bank, ConceptBank)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_concept():
    plain = _train(tiny_unet(), None, 0, steps=3)
    unet = tiny_unet()
    ckpt = _train(unet, None, 0, steps=3, gradient_checkpointing=True)
    assert not unet.is_gradient_checkpointing, "the model's setting is restored"
    for name, cl in plain.concepts[0].layers.items():
        other = ckpt.concepts[0].layers[name]
        assert torch.allclose(cl.B, other.B, atol=1e-6), name


@pytest.mark.slow
def test_prior_loss_keeps_trigger_free_outputs_closer_to_the_base():
    unet = tiny_unet()
    c = ToyConcept(0)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300, 700])
    text = c.prior_text.expand(2, -1, -1)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=text).sample
    prior = {"x": x, "t": t, "text": text, "target": base}  # the base model is optimal on its prior

    def loss(model, batch):
        if "target" in batch:
            out = model(batch["x"], batch["t"], encoder_hidden_states=batch["text"]).sample
            return torch.nn.functional.mse_loss(out, batch["target"])
        return denoise_loss(model, batch)

    def prior_change(bank):
        with torch.no_grad(), compose(unet, bank, None, "merged"):
            return float(loss(unet, prior))

    changes = {}
    for weight in (0.0, 4.0):
        cfg = TrainConfig(
            name="c0",
            triggers=["tok0"],
            rank=4,
            steps=30,
            lr=2e-2,
            stats_batches=2,
            prior_loss_weight=weight,
            protect="off",
        )
        changes[weight] = prior_change(train_concept(unet, loss, c.batches(), cfg, None, lambda step: prior))
    assert changes[4.0] < 0.7 * changes[0.0], changes  # measured 0.46x
    with pytest.raises(ValueError, match="prior_loss_weight > 0 needs prior_batches"):
        train_concept(unet, loss, c.batches(), TrainConfig(name="x", prior_loss_weight=1.0, steps=1))
