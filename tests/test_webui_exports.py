"""Exported LoRA files for the A1111/Forge Lora network: names, sidecar card data, staleness, pruning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from seqlora_core import Concept, ConceptBank, ConceptLayer, LayerSpec
from seqlora_core.interop.bank_lora import export_concept
from seqlora_core.interop.lora_read import read_lora_file
from seqlora_webui import exports
from seqlora_webui._core import export_lora

LAYERS = [
    LayerSpec("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "linear", 16, 16),
    LayerSpec("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "linear", 16, 8),
    LayerSpec("middle_block.1.proj_in", "conv2d", 16, 16 * 9, (3, 3)),
]


def concept(name: str, seed: int, rank: int = 2, triggers: tuple[str, ...] = ("trig",)) -> Concept:
    g = torch.Generator().manual_seed(seed)
    layers = {
        s.name: ConceptLayer(
            torch.linalg.qr(torch.randn(s.in_features, rank, generator=g))[0].T.contiguous(),
            torch.randn(s.out_features, rank, generator=g) * 0.1,
        )
        for s in LAYERS
    }
    return Concept(name, list(triggers), rank, "seqlora", layers)


def bank_of(*cs: Concept) -> ConceptBank:
    bank = ConceptBank(list(LAYERS), "ldm", "sd15")
    for c in cs:
        bank = bank.with_concept(c)
    return bank


def test_names_are_unique_and_safe():
    assert exports.network_name("my bank.safetensors", "sks") == "my_bank__sks"
    assert exports.network_name("sub/b.safetensors", "sks") == "sub_b__sks"
    a, b = exports.network_name("b.safetensors", "a b"), exports.network_name("b.safetensors", "a_b")
    assert a != b and a.startswith("b__a_b-") and b == "b__a_b"
    assert exports.network_name("b.safetensors", "x").startswith(exports.bank_prefix("b.safetensors"))


def test_export_lora_sets_the_alias_and_keeps_the_tensors(tmp_path):
    bank = bank_of(concept("sks", 0))
    ref = export_concept(bank, "sks", tmp_path / "ref.safetensors", "kohya", "fp32")
    out = export_lora(bank, "sks", tmp_path / "b__sks.safetensors", "b__sks", "fp32")
    a, b = load_file(ref), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "b__sks" and meta["modelspec.title"] == "b__sks"
    assert meta["modelspec.trigger_phrase"] == "trig"


def test_sync_writes_current_files_with_card_data(tmp_path):
    bank = bank_of(concept("sks", 0, triggers=("sks dog", "sks")), concept("zqx", 1))
    done = exports.sync("b.safetensors", bank, tmp_path)
    assert [(e.concept, e.network, e.written) for e in done] == [("sks", "b__sks", True), ("zqx", "b__zqx", True)]
    side = json.loads((tmp_path / "seqlora" / "b__sks.json").read_text())
    assert side["activation text"] == "sks dog, sks" and side["sd version"] == "SD1"
    assert side["preferred weight"] == 1.0 and side["seqlora"]["bank"] == "b.safetensors"
    # the file holds exactly B @ A per layer (fp32), under the bank's LDM names
    factors, _meta, triggers = read_lora_file(done[0].path, "ldm", module_names=[s.name for s in LAYERS])
    assert triggers == ["sks dog", "sks"]
    for s in LAYERS:
        down, up = factors[s.name]
        got = up.reshape(up.shape[0], -1).float() @ down.reshape(down.shape[0], -1).float()
        torch.testing.assert_close(got, bank.concept("sks").delta(s.name), rtol=1e-6, atol=1e-7)


def test_unchanged_concepts_keep_their_files_and_changes_rewrite_only_them(tmp_path):
    bank = bank_of(concept("sks", 0), concept("zqx", 1))
    exports.sync("b.safetensors", bank, tmp_path)
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "seqlora").iterdir()}
    side = tmp_path / "seqlora" / "b__sks.json"
    edited = {**json.loads(side.read_text()), "preferred weight": 0.8, "notes": "mine"}
    side.write_text(json.dumps(edited))
    again = exports.sync("b.safetensors", bank, tmp_path)
    assert not any(e.written for e in again)
    # a new concept and a changed one
    changed = bank.concept("zqx")
    for cl in changed.layers.values():
        cl.B = cl.B * 2
    bank = bank.with_concept(concept("new", 2))
    done = {e.concept: e.written for e in exports.sync("b.safetensors", bank, tmp_path)}
    assert done == {"sks": False, "zqx": True, "new": True}
    assert (tmp_path / "seqlora" / "b__sks.safetensors").stat().st_mtime_ns == files["b__sks.safetensors"]
    assert json.loads(side.read_text())["preferred weight"] == 0.8  # the user's edit survives
    # another precision is another file content
    assert all(e.written for e in exports.sync("b.safetensors", bank, tmp_path, ["sks"], dtype="fp16"))


def test_dropped_concepts_lose_their_files_and_other_banks_keep_theirs(tmp_path):
    bank = bank_of(concept("sks", 0), concept("zqx", 1))
    exports.sync("b.safetensors", bank, tmp_path)
    exports.sync("b2.safetensors", bank, tmp_path)
    (tmp_path / "seqlora" / "b__user_file.safetensors").write_bytes(b"x")  # not ours: no sidecar
    exports.sync("b.safetensors", bank.without("zqx"), tmp_path)
    names = sorted(p.name for p in (tmp_path / "seqlora").glob("*.safetensors"))
    assert names == ["b2__sks.safetensors", "b2__zqx.safetensors", "b__sks.safetensors", "b__user_file.safetensors"]
    assert not (tmp_path / "seqlora" / "b__zqx.json").exists()


def test_unknown_concept_is_a_clear_error(tmp_path):
    with pytest.raises(KeyError, match="no concept 'nope' in the bank; it has: sks"):
        exports.sync("b.safetensors", bank_of(concept("sks", 0)), tmp_path, ["nope"])
    assert not (tmp_path / "seqlora").exists()
