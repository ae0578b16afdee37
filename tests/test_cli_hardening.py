"""Every bad input to the command line is an ``error: <flag>: ...`` line with exit code 2 and leaves every
file as it was; exports never replace a bank or an existing file unasked; ``remove`` keeps the previous
version; interruptions (Ctrl-C, SIGTERM, an error while writing) lose nothing and the same command
resumes; a diverging run stops with a message and keeps its last good progress."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _images import make_images
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from seqlora_core.apps.cli import main
from seqlora_core.interop.bank_lora import export_concept
from seqlora_core.method.bank import ConceptBank
from tests._banks import first_bank, synthetic_bank


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def made_files(tmp_path_factory) -> Path:
    """A bank, a LoRA, a hostile bank, a NaN LoRA and an image folder."""
    tmp_path = tmp_path_factory.mktemp("inputs")
    bank = synthetic_bank()
    bank.save(tmp_path / "bank.safetensors")
    synthetic_bank(3).save(tmp_path / "other_bank.safetensors")
    export_concept(bank, "c0", tmp_path / "lora.safetensors", "kohya", "fp32")
    tensors = load_file(tmp_path / "lora.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[key][0, 0] = float("nan")
    (tmp_path / "nan_lora.safetensors").write_bytes(st_save(tensors))
    raw = load_file(tmp_path / "bank.safetensors")
    raw["c0.1.A"][0, 0] = float("inf")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bank.safetensors"), "pt") as f:
        meta = f.metadata()
    (tmp_path / "hostile.safetensors").write_bytes(st_save(raw, metadata=meta))
    make_images(tmp_path / "img", 0)
    return tmp_path


@pytest.fixture()
def files(made_files: Path, tmp_path: Path) -> Path:
    """A fresh copy of :func:`made_files` for one test."""
    return Path(shutil.copytree(made_files, tmp_path / "files"))


def _train(*extra: str) -> list[str]:
    base = ["train", "--base", "tiny", "--images", "img", "--trigger", "zq dog", "--bank", "new.safetensors"]
    return [*base, "--steps", "2", "--quiet", *extra]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

# (argv, what the message must say); every one fails before a model is loaded
BAD_INPUTS = [
    (_train("--trigger", ""), "--trigger: empty"),
    (_train("--trigger", "x" * 300), "--trigger: 300 characters is too long"),
    (_train("--trigger", "\x1b[31mred"), "--trigger: the text holds control characters"),
    (_train("--trigger", ", :"), "--name: the trigger ', :' gives no usable concept name"),
    (_train("--name", "a,b"), "--name: 'a,b' holds ','"),
    (_train("--name", "dog:2"), "--name: 'dog:2' holds ':'"),
    (_train("--name", "  "), "--name: empty"),
    (_train("--lr", "1e10"), "--lr: 1e+10 is out of range"),
    (_train("--lr", "0"), "--lr: 0 is out of range"),
    (_train("--lr", "nan"), "--lr: nan; give a finite number"),
    (_train("--budget", "nan"), "--budget: nan; give a finite number"),
    (_train("--budget", "-1"), "--budget: -1.0; the interference budget must be a number >= 0"),
    (_train("--checkpoint-every", "0"), "--checkpoint-every: 0; save progress every 1 or more steps"),
    (_train("--steps", "0"), "--steps: 0"),
    (_train("--rank", "0"), "--rank: 0 is out of range"),
    (_train("--rank", "1000"), "--rank: 1000 is out of range"),
    (_train("--batch-size", "0"), "--batch-size: 0"),
    (_train("--resolution", "100"), "--resolution: 100; use a positive multiple of 8"),
    (_train("--resolution", "65536"), "--resolution: 65536; use at most 2048"),
    (_train("--prior-images", "0"), "--prior-images: 0"),
    (_train("--min-snr-gamma", "nan"), "--min-snr-gamma: nan; give a positive number"),
    (_train("--min-snr-gamma", "-1"), "--min-snr-gamma: -1.0; give a positive number"),
    (_train("--caption-template", "a {foo}"), "--caption-template: 'a {foo}' names {foo}"),
    (_train("--caption-template", "a {"), "--caption-template: 'a {' is not a valid template"),
    (_train("--device", "tpu9"), "--device: 'tpu9'"),
    pytest.param(_train("--device", "cuda"), "--device: 'cuda' was asked for", marks=NO_CUDA),
    (_train("--images", "nowhere"), "--images: image folder not found"),
    (_train("--bank", "bank.png"), "--bank: 'bank.png'; give a file name ending in .safetensors"),
    (_train("--bank", "lora.safetensors"), "is a safetensors file but not a SeqLoRA bank"),
    (_train("--bank", "hostile.safetensors"), "concept 'c0' at layer"),
    (_train("--bank", "bank.safetensors", "--name", "c0"), "--name: 'c0' is already in the bank"),
    (
        ["generate", "--base", "tiny", "--bank", "bank.safetensors", "--prompt", "x", "--out", "x.png", "--steps", "0"],
        "--steps: 0",
    ),
    (
        [
            "generate",
            "--base",
            "tiny",
            "--bank",
            "bank.safetensors",
            "--prompt",
            "x",
            "--out",
            "x.png",
            "--guidance",
            "nan",
        ],
        "--guidance: nan",
    ),
    (
        ["generate", "--base", "tiny", "--bank", "bank.safetensors", "--prompt", "x", "--out", "bank.safetensors"],
        "--out: 'bank.safetensors'; give a file name ending in .png",
    ),
    (
        [
            "generate",
            "--base",
            "tiny",
            "--bank",
            "bank.safetensors",
            "--prompt",
            "x",
            "--out",
            "x.png",
            "--concepts",
            "c0:nan",
        ],
        "--concepts: strength 'nan' of 'c0' is not a finite number",
    ),
    (
        [
            "generate",
            "--base",
            "tiny",
            "--bank",
            "bank.safetensors",
            "--prompt",
            "x",
            "--out",
            "x.png",
            "--concepts",
            "ghost",
        ],
        "no concept 'ghost' in the bank; it has: c0, c1",
    ),
    (
        [
            "generate",
            "--base",
            "tiny",
            "--bank",
            "bank.safetensors",
            "--prompt",
            "x",
            "--out",
            "x.png",
            "--concepts",
            "c0:1e9",
        ],
        "--concepts: strength 1e+09 of 'c0' is outside -20..20",
    ),
    (
        ["generate", "--base", "tiny", "--bank", "hostile.safetensors", "--prompt", "x", "--out", "x.png"],
        "holds NaN or infinite values",
    ),
    (
        ["export", "--bank", "bank.safetensors", "--concept", "c0", "--out", "bank.safetensors"],
        "--out: bank.safetensors is the bank itself",
    ),
    (
        ["export", "--bank", "bank.safetensors", "--concept", "c0", "--out", "lora.safetensors"],
        "--out: lora.safetensors already exists; choose another file name, or allow overwriting",
    ),
    (
        ["export", "--bank", "bank.safetensors", "--concept", "c0", "--out", "other_bank.safetensors", "--force"],
        "--out: other_bank.safetensors is a SeqLoRA bank",
    ),
    (
        ["export", "--bank", "bank.safetensors", "--concept", "c0", "--out", "c0.png"],
        "--out: 'c0.png'; give a file name ending in .safetensors",
    ),
    (["export", "--bank", "bank.safetensors", "--concept", "ghost", "--out", "g.safetensors"], "it has: c0, c1"),
    (
        ["import", "--bank", "bank.safetensors", "--lora", "nan_lora.safetensors", "--name", "theirs"],
        "nan_lora.safetensors: module",
    ),
    (["import", "--bank", "bank.safetensors", "--lora", "lora.safetensors", "--name", "a:b"], "--name: 'a:b'"),
    (
        ["import", "--bank", "bank.safetensors", "--lora", "lora.safetensors", "--name", "c0"],
        "'c0' is already in the bank",
    ),
    (
        ["import", "--bank", "missing.safetensors", "--lora", "lora.safetensors", "--name", "x"],
        "--bank: missing.safetensors does not exist",
    ),
    (["remove", "--bank", "bank.safetensors", "--concept", "ghost"], "no concept 'ghost' in the bank"),
    (["report", "--bank", "hostile.safetensors"], "holds NaN or infinite values"),
    (["report", "--bank", "bank.safetensors", "--png", "heat.txt"], "--png: 'heat.txt'"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[f"{i:02d}" for i in range(len(BAD_INPUTS))])
def test_bad_input_is_a_clear_error_and_touches_nothing(files, monkeypatch, capsys, argv, message) -> None:
    monkeypatch.chdir(files)
    monkeypatch.setattr("seqlora_core.apps.bases.load_base", _no_model)
    before = digests(files)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert digests(files) == before, "a failed command changes no file"


def _no_model(*_a, **_k):
    raise AssertionError("a bad input must be refused before a model is loaded")


def test_export_with_force_keeps_the_old_file(files, monkeypatch) -> None:
    monkeypatch.chdir(files)
    old = (files / "lora.safetensors").read_bytes()
    args = ["export", "--bank", "bank.safetensors", "--concept", "c1", "--out", "lora.safetensors", "--force"]
    assert main(args) == 0
    assert (files / "lora.safetensors.bak").read_bytes() == old
    assert (files / "lora.safetensors").read_bytes() != old


def test_remove_drops_a_concept_and_keeps_the_previous_version(files, monkeypatch, capsys) -> None:
    monkeypatch.chdir(files)
    old = (files / "bank.safetensors").read_bytes()
    assert main(["remove", "--bank", "bank.safetensors", "--concept", "c0"]) == 0
    assert "bank.safetensors.bak" in capsys.readouterr().out
    assert ConceptBank.load(files / "bank.safetensors").names() == ["c1"]
    assert (files / "bank.safetensors.bak").read_bytes() == old


@pytest.mark.slow
def test_a_pickle_base_is_refused_unless_allowed(tmp_path, monkeypatch, capsys) -> None:
    from seqlora_core.backends.diffusers_backend import load_pipeline
    from seqlora_core.backends.tiny import build_tiny_pipeline

    folder = tmp_path / "pickled"
    build_tiny_pipeline().save_pretrained(folder, safe_serialization=False)
    assert list(folder.glob("unet/*.bin")) and not list(folder.glob("unet/*.safetensors"))
    make_images(tmp_path / "img", 0)
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--base", str(folder), "--images", "img", "--trigger", "zq", "--bank", "b.safetensors"])
    err = capsys.readouterr().err
    assert rc == 2 and "pickle files" in err and "--allow-pickle" in err and "unet" in err
    assert not (tmp_path / "b.safetensors").exists()
    assert load_pipeline(folder, allow_pickle=True).unet is not None


# ------------------------------------------------------------------------- interruptions, divergence, resume

TRAIN = ["--steps", "5", "--checkpoint-every", "1", "--stats-batches", "2", "--lr", "5e-3", "--quiet"]


def _args(root: Path, bank: str, *extra: str) -> list[str]:
    images = str(root / "img")
    return ["train", "--base", "tiny", "--images", images, "--trigger", "zq dog", "--bank", bank, *TRAIN, *extra]


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory) -> tuple[Path, Path, ConceptBank]:
    """A bank with a first concept (so later runs skip the prior), and a straight run of a second one."""
    root = tmp_path_factory.mktemp("resume")
    make_images(root / "img", 1)
    make_images(root / "first_img", 0)
    first = root / "first.safetensors"
    first_bank(root / "first_img", first)
    straight = root / "straight.safetensors"
    straight.write_bytes(first.read_bytes())
    assert main(_args(root, str(straight))) == 0
    return root, first, ConceptBank.load(straight)


def _same_concept(a: ConceptBank, b: ConceptBank, name: str = "zq") -> bool:
    ca, cb = a.concept(name), b.concept(name)
    return ca.loss_curve == cb.loss_curve and all(
        torch.equal(cl.A, cb.layers[k].A) and torch.equal(cl.B, cb.layers[k].B) for k, cl in ca.layers.items()
    )


def _copy_first(root: Path, first: Path, name: str) -> Path:
    bank = root / name
    bank.write_bytes(first.read_bytes())
    return bank


def _on_step(monkeypatch, step: int, action) -> None:
    """Run ``action`` when the loss of ``step`` (0-based) is computed."""
    import seqlora_core.backends.diffusers_backend as backend

    real = backend.diffusion_loss

    def loss(unet, batch):
        if batch.get("step") == step:
            out = action(unet, batch, real)
            if out is not None:
                return out
        return real(unet, batch)

    monkeypatch.setattr(backend, "diffusion_loss", loss)


@pytest.mark.slow
def test_sigterm_saves_progress_and_the_same_command_resumes(trained_base, monkeypatch, capsys) -> None:
    root, first, straight = trained_base
    bank = _copy_first(root, first, "term.safetensors")
    old = bank.read_bytes()
    _on_step(monkeypatch, 2, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    assert main(_args(root, str(bank))) == 143
    assert "run the same command to resume" in capsys.readouterr().err
    checkpoint = root / "term.zq.partial.safetensors"
    assert bank.read_bytes() == old and checkpoint.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is put back"
    monkeypatch.undo()
    assert main(_args(root, str(bank))) == 0
    assert _same_concept(ConceptBank.load(bank), straight), "resumed == uninterrupted"
    assert not checkpoint.exists()


@pytest.mark.slow
def test_resume_with_other_data_or_settings_says_what_changed(trained_base, monkeypatch, capsys) -> None:
    root, first, straight = trained_base
    bank = _copy_first(root, first, "changed.safetensors")
    _on_step(monkeypatch, 2, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(_args(root, str(bank))) == 130
    monkeypatch.undo()
    checkpoint = root / "changed.zq.partial.safetensors"
    saved = checkpoint.read_bytes()
    for extra, change in (
        (["--batch-size", "2"], "data batch_size: 1 -> 2"),
        (["--lr", "4e-3"], "lr: 0.005 -> 0.004"),
        (["--caption-template", "zq dog in a {trigger} style"], "data caption_template"),
    ):
        capsys.readouterr()
        assert main(_args(root, str(bank), *extra)) == 2
        err = capsys.readouterr().err
        assert change in err and "delete that file to start the concept over, or add --restart" in err, err
        assert checkpoint.read_bytes() == saved, "the checkpoint is left alone"
    (root / "img" / "extra.png").write_bytes((root / "img" / "1.png").read_bytes())
    try:
        assert main(_args(root, str(bank))) == 2
        assert "data images:" in capsys.readouterr().err
    finally:
        (root / "img" / "extra.png").unlink()
    assert main(_args(root, str(bank), "--lr", "4e-3", "--restart")) == 0
    assert ConceptBank.load(bank).concept("zq").info["config"]["lr"] == 4e-3


@pytest.mark.slow
def test_an_interrupt_while_writing_the_bank_keeps_the_checkpoint(trained_base, monkeypatch, capsys) -> None:
    root, first, straight = trained_base
    bank = _copy_first(root, first, "write.safetensors")
    old = bank.read_bytes()
    real_save = ConceptBank.save

    def interrupted(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(ConceptBank, "save", interrupted)
    assert main(_args(root, str(bank))) == 130
    monkeypatch.setattr(ConceptBank, "save", real_save)
    checkpoint = root / "write.zq.partial.safetensors"
    assert bank.read_bytes() == old and checkpoint.exists(), "the bank is the old one; the progress is kept"
    assert main(_args(root, str(bank))) == 0
    assert _same_concept(ConceptBank.load(bank), straight) and not checkpoint.exists()


@pytest.mark.slow
def test_a_leftover_checkpoint_of_a_written_bank_is_recognised(trained_base, monkeypatch, capsys) -> None:
    """Killed after the bank was written but before its checkpoint was removed: the rerun does not train
    again and does not fail on the name it finds in the bank."""
    import seqlora_core.method.trainer as trainer

    root, first, straight = trained_base
    bank = _copy_first(root, first, "left.safetensors")
    monkeypatch.setattr(trainer, "discard_checkpoint", lambda config: None)
    assert main(_args(root, str(bank))) == 0
    monkeypatch.undo()
    checkpoint = root / "left.zq.partial.safetensors"
    written = bank.read_bytes()
    assert checkpoint.exists()
    capsys.readouterr()
    assert main(_args(root, str(bank))) == 0
    assert "already in" in capsys.readouterr().out
    assert bank.read_bytes() == written and not checkpoint.exists()


@pytest.mark.slow
def test_a_diverging_run_stops_with_a_message_and_keeps_the_last_good_state(trained_base, monkeypatch, capsys):
    root, first, _ = trained_base
    bank = _copy_first(root, first, "nan.safetensors")
    old = bank.read_bytes()
    _on_step(monkeypatch, 3, lambda unet, batch, real: real(unet, batch) * float("nan"))
    assert main(_args(root, str(bank))) == 2
    err = capsys.readouterr().err
    assert "diverged: the loss is nan at step 4" in err and "Lower the learning rate (now 0.005)" in err, err
    assert "The last good progress is kept in" in err
    checkpoint = root / "nan.zq.partial.safetensors"
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        assert f.metadata()["step"] == "3", "the checkpoint holds the last good step"
        assert all(bool(torch.isfinite(f.get_tensor(k)).all()) for k in f.keys())  # noqa: SIM118
    assert bank.read_bytes() == old


@pytest.mark.slow
def test_rank_above_a_layer_width_is_a_clear_error(trained_base, capsys) -> None:
    root, first, _ = trained_base
    bank = _copy_first(root, first, "rank.safetensors")
    old = bank.read_bytes()
    assert main(_args(root, str(bank), "--rank", "200")) == 2
    err = capsys.readouterr().err
    assert "--rank: 200 is more than layer" in err and "use at most 32" in err, err
    assert bank.read_bytes() == old


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="with torchvision there is no notice")
def test_the_command_line_keeps_transformers_torchvision_notice_out_of_its_output(tmp_path: Path) -> None:
    """diffusers' pipelines import transformers' image processors, which without torchvision log a notice
    asking to install it; the command line never uses them, so its output does not carry that notice."""
    code = (
        "import sys\n"
        "from seqlora_core.apps.cli import main\n"
        "if sys.argv[1] == 'cli':\n"
        "    main(['report', '--bank', sys.argv[2]])\n"
        "import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    runs = {
        how: subprocess.run(
            [sys.executable, "-c", code, how, str(tmp_path / "none.safetensors")],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for how in ("cli", "library")
    }
    assert "torchvision" in runs["library"].stderr, "the notice this test is about no longer appears"
    assert "does not exist" in runs["cli"].stderr
    assert "torchvision" not in runs["cli"].stderr
