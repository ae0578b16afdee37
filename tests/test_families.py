"""Model families: one detector per host and one vocabulary, so a bank trained in one host fits the other.

The command line used to label every non-SDXL model ``sd15``: an SD2 bank got SD1 metadata in its
exported LoRAs, and the ComfyUI loader (which names SD2 models ``sd2``) refused it.
"""

from __future__ import annotations

import pytest
from _images import make_images
from _tiny_sd import SD15_CONFIG, SDXL_CONFIG, tiny_pipeline
from safetensors import safe_open

from seqlora_core import BankMismatchError, ConceptBank
from seqlora_core.apps.cli import main
from seqlora_core.interop.families import (
    check_bank_fits,
    family_from_comfy,
    family_from_diffusers,
    kohya_base_version,
    same_layout,
)


def test_diffusers_detector() -> None:
    assert family_from_diffusers(SD15_CONFIG) == "sd15"
    assert family_from_diffusers(SD15_CONFIG | {"cross_attention_dim": 1024}) == "sd2"
    assert family_from_diffusers(SD15_CONFIG | {"cross_attention_dim": 1024}, "v_prediction") == "sd2v"
    assert family_from_diffusers(SDXL_CONFIG) == "sdxl"
    assert family_from_diffusers(SD15_CONFIG | {"cross_attention_dim": 32}) == "sd15"  # small test models


def test_comfyui_detector_and_kohya_names() -> None:
    assert [family_from_comfy(c) for c in ("SD15", "SD20", "SD21UnclipH", "SDXL", "Flux")] == [
        "sd15",
        "sd2",
        "sd2",
        "sdxl",
        "flux",
    ]
    assert family_from_comfy("SD20", v_prediction=True) == "sd2v"
    assert family_from_comfy("SD15", v_prediction=True) == "sd15"
    assert [kohya_base_version(a) for a in ("sd15", "sd2", "sd2v", "sdxl", "toy")] == [
        "sd_v1",
        "sd_v2",
        "sd_v2_v",
        "sdxl_base_v1-0",
        "sd_v1",
    ]


def test_which_banks_fit_which_models() -> None:
    assert same_layout("sd2", "sd2v") and same_layout("SD2V", "sd2") and not same_layout("sd15", "sd2")
    check_bank_fits("sd2v", "sd2")
    check_bank_fits("unknown", "sdxl")
    with pytest.raises(BankMismatchError, match="trained on sd15 but the model is sdxl"):
        check_bank_fits("sd15", "sdxl")


@pytest.mark.slow
def test_command_line_labels_an_sd2_v_bank_so_comfyui_accepts_it(tmp_path) -> None:
    pipe = tiny_pipeline(tmp_path, context_dim=1024, text_layers=1, prediction_type="v_prediction")
    pipe.save_pretrained(tmp_path / "sd2v")
    bank = tmp_path / "bank.safetensors"
    images = make_images(tmp_path / "dog", 0, n=2)
    args = ["train", "--base", str(tmp_path / "sd2v"), "--images", str(images), "--trigger", "sks dog"]
    assert main([*args, "--bank", str(bank), "--steps", "1", "--quiet", "--device", "cpu"]) == 0
    trained = ConceptBank.load(bank)
    assert trained.architecture == "sd2v"
    for v_prediction in (True, False):  # the ComfyUI loader's check against an SD2.x model
        check_bank_fits(trained.architecture, family_from_comfy("SD20", v_prediction))
    with pytest.raises(BankMismatchError):
        check_bank_fits(trained.architecture, family_from_comfy("SD15"))
    out = tmp_path / "sks.safetensors"
    assert main(["export", "--bank", str(bank), "--concept", "sks", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2_v", "True")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
