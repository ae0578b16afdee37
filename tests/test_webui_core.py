"""The A1111/Forge extension's host-free parts: banks folder, LDM loss maths, training form, packaging."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqlora_core import BankFormatError, ConceptBank, LayerSpec
from seqlora_webui import ldm_loss, views
from seqlora_webui.banks import BankFolder, read_header
from seqlora_webui.training import TrainInputError, TrainRequest, loss_chart_svg, saved_job

ROOT = Path(__file__).resolve().parents[1]


def small_bank() -> ConceptBank:
    return ConceptBank([LayerSpec("a.to_q", "linear", 4, 4)], "ldm", "sd15")


# ------------------------------------------------------------------------------------------ banks folder


def test_bank_names_stay_inside_the_folder(tmp_path):
    banks = BankFolder(tmp_path)
    assert banks.resolve("b", must_exist=False) == tmp_path / "b.safetensors"
    assert banks.resolve("sub/b.safetensors", must_exist=False) == tmp_path / "sub" / "b.safetensors"
    for bad in ["../b", "/etc/b", ".autosave/x", "", "a/../../b"]:
        with pytest.raises(ValueError):
            banks.resolve(bad, must_exist=False)
    with pytest.raises(FileNotFoundError, match="banks there: none yet"):
        banks.resolve("missing")
    assert banks.new_name(" my/odd:name ") == "odd_name.safetensors"


def test_listing_summary_and_cached_load(tmp_path):
    banks = BankFolder(tmp_path)
    small_bank().save(tmp_path / "one.safetensors")
    small_bank().save(tmp_path / "sub" / "two.safetensors")
    small_bank().save(tmp_path / ".autosave" / "hidden.safetensors")
    assert banks.list() == ["one.safetensors", "sub/two.safetensors"]
    s = banks.summary("one")
    assert s["bank"] == "one.safetensors" and s["architecture"] == "sd15" and s["concepts"] == []
    first = banks.load("one.safetensors")
    assert banks.load("one.safetensors") is first
    banks.save("one.safetensors", ConceptBank([LayerSpec("a.to_q", "linear", 4, 4)], "ldm", "sd2"))
    assert banks.load("one.safetensors").architecture == "sd2"
    assert (tmp_path / ".autosave" / "one.previous.safetensors").is_file()  # the version before is kept


def test_files_that_are_not_banks_are_named_in_the_error(tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x07" * 100)
    with pytest.raises(BankFormatError, match="'garbage.safetensors' is corrupt or truncated"):
        read_header(tmp_path / "garbage.safetensors")
    from safetensors.torch import save_file

    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(tmp_path / "a_lora.safetensors"))
    with pytest.raises(BankFormatError, match="'a_lora.safetensors' is a safetensors file but not a SeqLoRA bank"):
        read_header(tmp_path / "a_lora.safetensors")


# ------------------------------------------------------------------------------------------ LDM loss


def sd_schedule() -> torch.Tensor:
    """LDM's "linear" schedule of SD1.x (linspace of square roots, squared), as v1-inference.yaml gives it."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_noising_and_targets_match_diffusers_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    acp = sd_schedule()
    torch.testing.assert_close(acp.float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-7)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(ldm_loss.noisy_latents(x0, noise, acp, t), sched.add_noise(x0, noise, t))
    torch.testing.assert_close(ldm_loss.target(x0, noise, acp, t, "v"), sched.get_velocity(x0, noise, t))
    assert ldm_loss.target(x0, noise, acp, t, "eps") is noise
    with pytest.raises(ValueError, match="'x0'"):
        ldm_loss.target(x0, noise, acp, t, "x0")


def test_batches_are_a_pure_function_of_the_step():
    b = ldm_loss.make_batches(5, 2, seed=3, latent_shape=(4, 8, 8), num_timesteps=1000)
    again = ldm_loss.make_batches(5, 2, seed=3, latent_shape=(4, 8, 8), num_timesteps=1000)
    prior = ldm_loss.make_batches(5, 2, seed=3, latent_shape=(4, 8, 8), num_timesteps=1000, prior=True)
    for step in (0, 7):
        x, y = b(step), again(step)
        assert all(torch.equal(x[k], y[k]) for k in ("idx", "noise", "t"))
        assert not torch.equal(x["noise"], prior(step)["noise"]) and prior(step)["prior"]
    assert not torch.equal(b(0)["noise"], b(1)["noise"])
    assert int(b(0)["t"].max()) < 1000 and int(b(0)["idx"].max()) < 5
    with pytest.raises(ValueError, match="no training images"):
        ldm_loss.make_batches(0, 1, 0, (4, 8, 8), 1000)


# ------------------------------------------------------------------------------------------ training form


def form(tmp_path: Path, **kw) -> TrainRequest:
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    return TrainRequest(**{"bank": "b", "name": "sks", "triggers": "sks dog", "images": str(images), **kw})


@pytest.mark.parametrize(
    "change,message",
    [
        ({"name": " "}, "concept name: empty"),
        ({"triggers": " , "}, "trigger words: empty"),
        ({"images": "/no/such/folder"}, "image folder: '/no/such/folder' does not exist"),
        ({"method": "nope"}, "method: unknown 'nope'"),
        ({"targets": "everything"}, "targets: unknown 'everything'"),
        ({"resolution": 30}, "resolution: 30; use a positive multiple of 8"),
        ({"rank": 0}, "rank: 0 is out of range"),
        ({"steps": 0}, "steps: 0; use 1..10000000"),
        ({"bank": "../x"}, "inside the banks folder"),
    ],
)
def test_training_form_errors_name_the_field(tmp_path, change, message):
    with pytest.raises(TrainInputError, match=message.replace("(", r"\(")):
        form(tmp_path, **change).check(BankFolder(tmp_path / "banks"))


def test_training_form_from_the_api(tmp_path):
    ok = form(tmp_path)
    assert ok.check(BankFolder(tmp_path / "banks"))[0] == tmp_path / "banks" / "b.safetensors"
    assert TrainRequest.from_dict({"bank": "b", "name": "n", "triggers": "t", "images": "i"}).steps == 500
    with pytest.raises(TrainInputError, match="unknown training field.*colour"):
        TrainRequest.from_dict({"bank": "b", "name": "n", "triggers": "t", "images": "i", "colour": 1})
    with pytest.raises(TrainInputError, match="missing field.*images"):
        TrainRequest.from_dict({"bank": "b", "name": "n", "triggers": "t"})


def test_resume_without_an_interrupted_training_says_so(tmp_path):
    banks = BankFolder(tmp_path)
    with pytest.raises(TrainInputError, match="no interrupted training for concept 'sks'"):
        saved_job(banks, "b", "sks")
    job = tmp_path / ".autosave" / "b.sks.job.json"
    job.write_text(json.dumps({"bank": "b", "name": "sks", "triggers": "t", "images": "/x", "steps": 9}))
    assert saved_job(banks, "b", "sks").steps == 9
    assert saved_job(banks).steps == 9  # the most recent one


def test_loss_chart_and_views():
    assert loss_chart_svg([1.0]) == ""
    svg = loss_chart_svg([3.0, 2.0, math.nan, 1.0])
    assert svg.startswith("<svg") and svg.count(",") == 3
    rep = {
        "concepts": ["a", "b"],
        "interference": [[1, 0.25], [0.5, 1]],
        "base_drift": [0.1, 0.2],
        "mean_relative_interference": 0.375,
    }
    text = views.report_html(rep, [{"a": "a", "b": "b", "a_on_b": 0.25, "b_on_a": 0.5}])
    assert "0.2500" in text and "0.5000" in text and "&rarr;" in text
    assert "no concept is on" in views.selection_info([{"name": "a", "triggers": ["x"]}], {})
    assert "<b>a</b> 0.5: x" in views.selection_info([{"name": "a", "triggers": ["x"]}], {"a": 0.5})
    assert "&lt;b&gt;" in views.error_html("<b>")


# ------------------------------------------------------------------------------------------ packaging


def test_the_web_ui_imports_need_neither_diffusers_nor_transformers():
    code = (
        "import sys; import seqlora_core, seqlora_webui.accordion, seqlora_webui.api, seqlora_webui.tab; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'gradio', "
        "'modules', 'fastapi')); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_install_py_installs_nothing_and_preload_adds_the_banks_folder():
    out = subprocess.run([sys.executable, "install.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout == "" and out.stderr == ""
    assert "pip" not in (ROOT / "install.py").read_text().replace("pip install -r requirements", "")
    spec = importlib.util.spec_from_file_location("seqlora_preload", ROOT / "preload.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    parser = argparse.ArgumentParser()
    mod.preload(parser)
    assert parser.parse_args(["--seqlora-dir", "/b"]).seqlora_dir == "/b"
    assert parser.parse_args([]).seqlora_dir is None
