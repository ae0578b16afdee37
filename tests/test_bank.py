"""Bank persistence: bit-exact round trip, atomic writes, and every documented bad-input error."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from seqlora_core import (
    BankFormatError,
    BankMismatchError,
    BankVersionError,
    ConceptBank,
    DuplicateConceptError,
    TrainConfig,
    train_concept,
)
from tests._unet import ToyConcept, denoise_loss, tiny_unet


@pytest.fixture(scope="module")
def bank_and_unet():
    unet = tiny_unet()
    bank = None
    for cid in range(2):
        c = ToyConcept(cid)
        cfg = TrainConfig(name=f"c{cid}", triggers=[f"tok{cid}", "blue"], rank=4, steps=3, lr=1e-3, stats_batches=1)
        bank = train_concept(unet, denoise_loss, c.batches(), cfg, bank, prior_batches=c.batches(prior=True))
    return bank, unet


def test_round_trip_is_bit_exact(bank_and_unet, tmp_path):
    bank, _ = bank_and_unet
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    back = ConceptBank.load(path)
    assert back.layers == bank.layers and back.fingerprint == bank.fingerprint
    assert back.names() == bank.names()
    for c, d in zip(bank.concepts, back.concepts, strict=True):
        assert (c.triggers, c.rank, c.method, c.loss_curve, c.timings) == (
            d.triggers,
            d.rank,
            d.method,
            d.loss_curve,
            d.timings,
        )
        for name, cl in c.layers.items():
            dl = d.layers[name]
            assert torch.equal(cl.A, dl.A) and torch.equal(cl.B, dl.B)
            assert torch.equal(cl.sketch.U, dl.sketch.U) and torch.equal(cl.sketch.s, dl.sketch.s)
            assert cl.sketch.trace == dl.sketch.trace and cl.soft == dl.soft
    for name, sk in bank.prior.items():
        assert torch.equal(sk.U, back.prior[name].U) and torch.equal(sk.s, back.prior[name].s)
    # saving the loaded bank again gives the same header and tensors
    # (safetensors' own metadata order is not fixed, so bytes are not compared)
    path2 = tmp_path / "again.safetensors"
    back.save(path2)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f1, safe_open(path2, "pt") as f2:
        assert json.loads(f1.metadata()["seqlora"]) == json.loads(f2.metadata()["seqlora"])
    t1, t2 = load_file(path), load_file(path2)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_save_is_atomic_and_leaves_no_temp_files(bank_and_unet, tmp_path):
    bank, _ = bank_and_unet
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    old = path.read_bytes()

    class Boom(Exception):
        pass

    import seqlora_core.files as bank_mod

    real = bank_mod.os.fsync

    def failing_fsync(fd):
        raise Boom()

    bank_mod.os.fsync = failing_fsync
    try:
        with pytest.raises(Boom):
            bank.truncated_before("c1").save(path)
    finally:
        bank_mod.os.fsync = real
    assert path.read_bytes() == old, "a failed save must leave the previous bank intact"
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]


def test_truncated_file_is_a_clear_error(bank_and_unet, tmp_path):
    bank, _ = bank_and_unet
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BankFormatError, match="corrupt or truncated"):
        ConceptBank.load(path)
    path.write_bytes(b"not a bank at all")
    with pytest.raises(BankFormatError, match=str(path.name)):
        ConceptBank.load(path)


def test_header_reads_without_the_tensors_with_the_same_errors(bank_and_unet, tmp_path):
    """One header reader for the bank and the ComfyUI file list (it used to have its own copy)."""
    from seqlora_core.method.bank import read_bank_header

    bank, _ = bank_and_unet
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    header = read_bank_header(path)
    assert [c["name"] for c in header["concepts"]] == ["c0", "c1"] and header["fingerprint"] == bank.fingerprint
    _rewrite_header(path, lambda h: h.update(schema_version=99))
    assert read_bank_header(path)["schema_version"] == 99  # a file browser still lists a newer bank
    with pytest.raises(BankVersionError):
        read_bank_header(path, check_version=True)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(BankFormatError, match="corrupt or truncated"):
        read_bank_header(path)
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(BankFormatError, match="not a SeqLoRA bank"):
        read_bank_header(path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_bank_header(tmp_path / "nope.safetensors")


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ConceptBank.load(tmp_path / "nope.safetensors")


def test_foreign_safetensors_is_not_taken_for_a_bank(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(BankFormatError, match="not a SeqLoRA bank"):
        ConceptBank.load(path)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    inner = json.loads(header["__metadata__"]["seqlora"])
    edit(inner)
    header["__metadata__"]["seqlora"] = json.dumps(inner)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_unknown_schema_version(bank_and_unet, tmp_path):
    bank, _ = bank_and_unet
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    _rewrite_header(path, lambda h: h.update(schema_version=99))
    with pytest.raises(BankVersionError, match="schema version 99.*Update SeqLoRA"):
        ConceptBank.load(path)


def test_duplicate_concept_name(bank_and_unet):
    bank, unet = bank_and_unet
    c = ToyConcept(5)
    with pytest.raises(DuplicateConceptError, match="'c1' is already in the bank"):
        train_concept(unet, denoise_loss, c.batches(), TrainConfig(name="c1", steps=1), bank)
    with pytest.raises(DuplicateConceptError):
        bank.with_concept(bank.concepts[0])


def test_bank_for_another_model_names_the_layers(bank_and_unet):
    bank, _ = bank_and_unet
    from tests._unet import UNet2DConditionModel

    other = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    with pytest.raises(BankMismatchError, match=r"attn1\.to_q: bank 32x32, model 16x16"):
        bank.check_model(other)


def test_bad_config_values_are_named():
    unet = tiny_unet()
    c = ToyConcept(0)
    for kw, pattern in [
        ({"name": " "}, "name: empty"),
        ({"name": "x", "rank": 0}, "rank: 0 is out of range"),
        ({"name": "x", "method": "magic"}, "method: unknown 'magic'"),
        ({"name": "x", "steps": 0}, "steps: 0"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            train_concept(unet, denoise_loss, c.batches(), TrainConfig(**kw))


def test_truncated_before_and_without(bank_and_unet):
    bank, _ = bank_and_unet
    assert bank.truncated_before("c1").names() == ["c0"]
    assert bank.without("c0").names() == ["c1"]
    assert bank.names() == ["c0", "c1"], "banks are immutable"
