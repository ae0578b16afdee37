"""``python -m seqlora_core`` end to end on ``--base tiny``: train twice, report, export, generate, errors."""

from __future__ import annotations

import json

import pytest
import torch
from _images import make_images
from PIL import Image
from safetensors import safe_open

from seqlora_core.apps.cli import main, parse_selection


@pytest.fixture(scope="module")
def cli_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    bank = root / "bank.safetensors"
    for i, trig in enumerate(["sks dog", "zqx hat"]):
        rc = main(
            [
                "train",
                "--base",
                "tiny",
                "--images",
                str(make_images(root / f"c{i}", i)),
                "--trigger",
                trig,
                "--bank",
                str(bank),
                "--steps",
                "3",
                "--lr",
                "5e-3",
                "--quiet",
            ]
        )
        assert rc == 0
    return root, bank


@pytest.mark.slow
def test_train_twice_then_report_json(cli_bank, capsys):
    _, bank = cli_bank
    capsys.readouterr()
    assert main(["report", "--bank", str(bank), "--base", "tiny", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["concepts"] == ["sks", "zqx"]
    assert len(rep["interference"]) == 2 and len(rep["bound"]) == 2 and len(rep["bound"][0]) == 2
    assert all(set(v) >= {"used", "total"} for v in rep["capacity"].values())
    assert all(v["used"] == 8 for v in rep["capacity"].values())


@pytest.mark.slow
def test_report_png(cli_bank):
    root, bank = cli_bank
    png = root / "heat.png"
    assert main(["report", "--bank", str(bank), "--png", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 60


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_export(cli_bank, fmt):
    root, bank = cli_bank
    out = root / f"zqx_{fmt}.safetensors"
    assert (
        main(["export", "--bank", str(bank), "--base", "tiny", "--concept", "zqx", "--format", fmt, "--out", str(out)])
        == 0
    )
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["modelspec.trigger_phrase"] == "zqx hat"
    assert keys and all(k.startswith("lora_unet_" if fmt == "kohya" else "unet.") for k in keys)


@pytest.mark.slow
def test_generate_with_two_concepts(cli_bank):
    root, bank = cli_bank
    for mode in ("merged", "bypass"):
        out = root / f"g_{mode}.png"
        assert (
            main(
                [
                    "generate",
                    "--base",
                    "tiny",
                    "--bank",
                    str(bank),
                    "--concepts",
                    "sks:1,zqx:0.8",
                    "--prompt",
                    "sks dog wearing zqx hat",
                    "--out",
                    str(out),
                    "--steps",
                    "2",
                    "--mode",
                    mode,
                ]
            )
            == 0
        )
        assert Image.open(out).size == (64, 64)


@pytest.mark.slow
def test_generate_reads_the_shared_selection_grammar(cli_bank):
    """'!name:s' lists a concept but leaves it off, as in the ComfyUI loader; the command line used to read
    '!zqx' as a concept called '!zqx' and fail."""
    root, bank = cli_bank

    def generate(concepts: str) -> bytes:
        out = root / "sel.png"
        args = ["generate", "--base", "tiny", "--bank", str(bank), "--concepts", concepts, "--steps", "2"]
        assert main([*args, "--prompt", "sks dog wearing zqx hat", "--out", str(out)]) == 0
        return Image.open(out).tobytes()

    only_sks = generate("sks:1")
    assert generate("sks:1, !zqx:0.8") == only_sks
    assert generate("sks:1, zqx:0.8") != only_sks


@pytest.mark.slow
def test_missing_image_folder_is_a_clear_error(cli_bank, capsys, tmp_path):
    _, bank = cli_bank
    rc = main(
        [
            "train",
            "--base",
            "tiny",
            "--images",
            str(tmp_path / "nowhere"),
            "--trigger",
            "x y",
            "--bank",
            str(bank),
            "--steps",
            "1",
            "--quiet",
        ]
    )
    assert rc == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.slow
def test_unknown_concept_and_duplicate_name(cli_bank, capsys, tmp_path):
    root, bank = cli_bank
    assert main(["export", "--bank", str(bank), "--concept", "nope", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "it has: sks, zqx" in capsys.readouterr().err
    rc = main(
        [
            "train",
            "--base",
            "tiny",
            "--images",
            str(root / "c0"),
            "--trigger",
            "sks dog",
            "--bank",
            str(bank),
            "--steps",
            "1",
            "--quiet",
        ]
    )
    assert rc == 2 and "already in the bank" in capsys.readouterr().err


def test_parse_selection():
    assert parse_selection("a:1.5, b ,c:-0.5") == {"a": 1.5, "b": 1.0, "c": -0.5}
    assert parse_selection("a:1, !b:0.5, c") == {"a": 1.0, "c": 1.0}
    with pytest.raises(SystemExit, match="--concepts: strength 'x' of 'a' is not a number"):
        parse_selection("a:x")


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_same_bank(tmp_path, monkeypatch):
    import seqlora_core.backends.diffusers_backend as backend
    from seqlora_core import ConceptBank

    images = make_images(tmp_path / "c", 3)
    args = [
        "train",
        "--base",
        "tiny",
        "--images",
        str(images),
        "--trigger",
        "sks dog",
        "--steps",
        "6",
        "--lr",
        "5e-3",
        "--checkpoint-every",
        "2",
        "--stats-batches",
        "2",
        "--quiet",
    ]
    assert main([*args, "--bank", str(tmp_path / "straight.safetensors")]) == 0

    real = backend.diffusion_loss
    calls = {"n": 0}

    def crash_at_step_five(unet, batch):
        if batch.get("step") == 4:  # steps 0..3 done: the last checkpoint is at step 4
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(unet, batch)

    monkeypatch.setattr(backend, "diffusion_loss", crash_at_step_five)
    bank = tmp_path / "resumed.safetensors"
    assert main([*args, "--bank", str(bank)]) == 130
    assert not bank.exists() and (tmp_path / "resumed.sks.partial.safetensors").exists()
    monkeypatch.setattr(backend, "diffusion_loss", real)
    assert main([*args, "--bank", str(bank)]) == 0
    a, b = ConceptBank.load(tmp_path / "straight.safetensors"), ConceptBank.load(bank)
    for name, cl in a.concepts[0].layers.items():
        assert torch.equal(cl.A, b.concepts[0].layers[name].A) and torch.equal(cl.B, b.concepts[0].layers[name].B)
    assert a.concepts[0].loss_curve == b.concepts[0].loss_curve
    assert not (tmp_path / "resumed.sks.partial.safetensors").exists()
