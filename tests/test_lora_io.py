"""A trained concept exported as a LoRA loads in diffusers' own loader; foreign LoRAs import as frozen concepts."""

from __future__ import annotations

import copy

import pytest
import torch
from _images import make_images
from safetensors import safe_open

from seqlora_core import TrainConfig, compose, train_concept
from seqlora_core.backends.diffusers_backend import DiffusersConceptData, diffusion_loss
from seqlora_core.backends.tiny import build_tiny_pipeline
from seqlora_core.interop.bank_lora import export_concept, import_lora
from seqlora_core.interop.lora_read import read_lora_file
from seqlora_core.interop.naming import diffusers_to_ldm_map

pytestmark = pytest.mark.slow  # trains models end to end

TOL = 1e-5  # max |diffusers-loaded - our merged| UNet output, fp32 files


def _concept_data(pipe, folder, trigger):
    from seqlora_core.data.dataset import ConceptDataset

    return DiffusersConceptData(pipe, ConceptDataset.from_folder(folder, trigger, resolution=64))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_io")
    pipe = build_tiny_pipeline()
    bank = None
    for i, trig in enumerate(["sks dog", "zqx hat"]):
        data = _concept_data(pipe, make_images(root / f"c{i}", i), trig)
        cfg = TrainConfig(
            name=trig.split()[0],
            triggers=[trig],
            steps=4,
            lr=5e-3,
            stats_batches=1,
            layer_naming="diffusers",
            architecture="sd15",
        )
        bank = train_concept(pipe.unet, diffusion_loss, data.batches, cfg, bank, data.prior_batches)
    return pipe, bank, root


def _unet_out(unet):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 32, 32, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([400]), encoder_hidden_states=ctx).sample


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_exported_concept_equals_our_composition_in_diffusers(trained, fmt, tmp_path):
    pipe, bank, _ = trained
    path = export_concept(bank, "zqx", tmp_path / f"zqx_{fmt}.safetensors", fmt, dtype="fp32")
    with compose(pipe.unet, bank, {"zqx": 1.0}, "merged"):
        ours = _unet_out(pipe.unet)
    base = _unet_out(pipe.unet)
    theirs_pipe = copy.deepcopy(pipe)
    theirs_pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    theirs = _unet_out(theirs_pipe.unet)
    err = float((ours - theirs).abs().max())
    assert float((ours - base).abs().max()) > 100 * TOL, "the concept must change the output"
    assert err <= TOL, f"diffusers' load_lora_weights vs our merge: max abs diff {err:.2e} > {TOL}"


def test_kohya_metadata_carries_triggers_and_alpha(trained, tmp_path):
    _, bank, _ = trained
    path = export_concept(bank, "sks", tmp_path / "sks.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        alpha = f.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert meta["modelspec.trigger_phrase"] == "sks dog"
    assert "sks dog" in meta["ss_tag_frequency"] and meta["seqlora_concept"] == "sks"
    assert all(
        k.startswith("lora_unet_down_blocks_")
        or k.startswith("lora_unet_up_blocks_")
        or k.startswith("lora_unet_mid_block_")
        for k in keys
    )
    assert float(alpha) == 4.0


def test_ldm_named_bank_exports_sd_scripts_names_that_read_back(trained, tmp_path):
    """A ComfyUI-trained (LDM-named) SD1 bank exports diffusers names, as sd-scripts writes SD1 LoRAs, in
    kohya and in PEFT form; both read back as the bank's factors."""
    from seqlora_core.apps.recipes import with_unet_structure

    pipe, bank, _ = trained
    with pytest.warns(UserWarning, match="keeps the bank's names"):  # a tiny UNet: no standard layout fits
        export_concept(bank.renamed_layers(diffusers_to_ldm_map(pipe.unet), "ldm"), "sks", tmp_path / "x.safetensors")
    ldm_bank = with_unet_structure(bank, pipe.unet).renamed_layers(diffusers_to_ldm_map(pipe.unet), "ldm")
    assert ldm_bank.layers[0].name.startswith(("input_blocks", "output_blocks", "middle_block"))
    for fmt in ("kohya", "peft"):
        path = export_concept(ldm_bank, "sks", tmp_path / f"ldm_{fmt}.safetensors", fmt, dtype="fp32")
        with safe_open(str(path), "pt") as f:
            keys, meta = list(f.keys()), f.metadata()
        assert meta["seqlora_layer_naming"] == "diffusers"
        assert all(".down_blocks" in k or ".up_blocks" in k or ".mid_block" in k or "_blocks_" in k for k in keys)
        assert not any("input_blocks" in k or "output_blocks" in k for k in keys)
        factors, _, _ = read_lora_file(path, "diffusers", pipe.unet)
        for spec in bank.layers:
            a, b = factors[spec.name]
            cl = bank.concept("sks").layers[spec.name]
            assert torch.equal(a, cl.A) and torch.equal(b, cl.B), spec.name


def test_imported_lora_is_frozen_and_later_concepts_avoid_it(trained, tmp_path):
    pipe, bank, root = trained
    path = export_concept(bank, "zqx", tmp_path / "foreign.safetensors", dtype="fp32")
    first_only = bank.truncated_before("zqx")
    with_foreign = import_lora(first_only, path, "foreign")
    imported = with_foreign.concept("foreign")
    assert imported.source == "imported" and imported.triggers == ["zqx hat"]
    for spec in bank.layers:
        want = bank.concept("zqx").delta(spec.name)
        got = imported.delta(spec.name)
        assert float((want - got).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max())), spec.name
    data = _concept_data(pipe, make_images(root / "c2", 2), "qqv cat")
    cfg = TrainConfig(name="qqv", triggers=["qqv cat"], steps=2, lr=5e-3, stats_batches=1)
    after = train_concept(pipe.unet, diffusion_loss, data.batches, cfg, with_foreign, data.prior_batches)
    worst = max(
        float((after.concept("qqv").layers[s.name].A @ imported.layers[s.name].A.T).abs().max()) for s in after.layers
    )
    assert worst <= 1e-4, f"new concept's basis vs the imported one: max |A_new A_imp^T| = {worst:.1e}"


def test_import_rejects_a_lora_for_another_model(trained, tmp_path):
    _, bank, _ = trained
    from seqlora_core.interop.lora_write import save_kohya

    name = bank.layers[0].name
    bad = {name: (torch.zeros(4, 7), torch.zeros(5, 4))}
    save_kohya(tmp_path / "bad.safetensors", bad, None, ["x"], "bad", dtype="fp32")
    with pytest.raises(ValueError, match="another base model"):
        import_lora(bank, tmp_path / "bad.safetensors", "bad")
