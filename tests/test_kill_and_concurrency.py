"""Real processes, really killed: ``kill -9`` at seeded random points of a training (steps, checkpoint
writes, the final write of the bank, between that write and the checkpoint's removal) leaves the bank old
or new, never broken, and the same command then finishes with the concept an uninterrupted run learns;
two trainers on one bank never lose a concept (the second fails naming the first, then succeeds)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _images import make_images

from seqlora_core.apps.cli import main
from seqlora_core.method.bank import ConceptBank
from tests._banks import first_bank

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--steps", "4", "--checkpoint-every", "1", "--stats-batches", "2", "--lr", "5e-3", "--quiet"]

# the command line with markers on stdout: the training's phases, every loss computed, and every fsync of a
# temp file or folder, after which it pauses so that a kill lands between writing and renaming
HARNESS = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    import torch
    torch.set_num_threads(1)
    import seqlora_core.backends.diffusers_backend as backend
    import seqlora_core.method.trainer as trainer
    from seqlora_core.apps.cli import main

    real_loss, real_phase, real_fsync = backend.diffusion_loss, trainer._phase, os.fsync

    def loss(unet, batch):
        print(f"loss {{batch.get('step')}}", flush=True)
        return real_loss(unet, batch)

    hold = os.environ.get("HOLD_UNTIL")  # a file: training waits for it to exist

    def phase(cb, name):
        print(f"phase {{name}}", flush=True)
        while hold and name == "train" and not os.path.exists(hold):
            time.sleep(0.1)
        real_phase(cb, name)

    def fsync(fd):
        real_fsync(fd)
        target = os.path.basename(os.readlink(f"/proc/self/fd/{{fd}}"))
        print(f"synced {{target}}", flush=True)
        time.sleep({pause})

    backend.diffusion_loss, trainer._phase, os.fsync = loss, phase, fsync
    sys.exit(main(sys.argv[1:]))
    """
)


def _harness(tmp: Path, pause: float) -> Path:
    path = tmp / f"harness_{int(pause * 1000)}.py"
    path.write_text(HARNESS.format(root=str(ROOT), pause=pause))
    return path


def _start(harness: Path, args: list[str], hold: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "HOLD_UNTIL": str(hold)} if hold else None
    return subprocess.Popen(
        [sys.executable, str(harness), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _train_args(root: Path, bank: Path, trigger: str, images: str) -> list[str]:
    folder = str(root / images)
    return ["train", "--base", "tiny", "--images", folder, "--trigger", trigger, "--bank", str(bank), *TRAIN]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A bank with a first concept (its prior made once), and image folders for two more."""
    root = tmp_path_factory.mktemp("kill")
    for i, name in enumerate(("first", "second", "third")):
        make_images(root / name, i)
    first = root / "first.safetensors"
    first_bank(root / "first", first)
    return root, first


def _factors(bank: ConceptBank, name: str) -> list[torch.Tensor]:
    c = bank.concept(name)
    return [t for s in bank.layers for t in (c.layers[s.name].A, c.layers[s.name].B)]


def _chosen_kill_points(seed: int, count: int) -> list[tuple[str, str]]:
    """(after, marker): kill at the first line starting with ``marker`` that follows one starting with
    ``after``. Seeded random choices among a training step, a checkpoint write, the final write of the bank,
    the folder sync right after it (the bank is new, the checkpoint not yet removed) and the final
    statistics; the last two runs are always killed in the final write and just after it."""
    rng = random.Random(seed)
    points = [
        ("phase train", f"loss {rng.randint(1, 3)}"),
        ("phase train", "synced .kill.zq.partial.safetensors."),
        (f"loss {rng.randint(1, 3)}", "synced .kill.zq.partial.safetensors."),
        ("phase final stats", "loss"),
    ]
    rng.shuffle(points)
    final_write = "synced .kill.safetensors."
    return [*points[:count], ("phase final stats", final_write), (final_write, "synced ")]


def test_kill_9_at_random_points_leaves_the_bank_old_or_new_and_the_run_resumes(setup, tmp_path) -> None:
    root, first = setup
    straight = tmp_path / "straight.safetensors"
    straight.write_bytes(first.read_bytes())
    assert main(_train_args(root, straight, "zq dog", "second")) == 0
    want = _factors(ConceptBank.load(straight), "zq")

    bank = root / "kill.safetensors"
    bank.write_bytes(first.read_bytes())
    old = bank.read_bytes()
    harness = _harness(tmp_path, pause=1.5)
    args = _train_args(root, bank, "zq dog", "second")
    history = []
    for after, marker in _chosen_kill_points(seed=7, count=2):
        proc = _start(harness, args)
        armed = False
        for line in proc.stdout:
            if armed and line.startswith(marker):
                proc.kill()
                break
            armed = armed or line.startswith(after)
        proc.wait(60)
        state = "old" if bank.read_bytes() == old else "new"
        loaded = ConceptBank.load(bank)  # never broken
        assert loaded.names() == (["sks"] if state == "old" else ["sks", "zq"])
        history.append((after, marker, proc.returncode, state))
    assert any(s == "new" for *_, s in history), history
    proc = _start(harness, args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert not (root / "kill.zq.partial.safetensors").exists(), "the finished run removed its progress file"
    got = _factors(ConceptBank.load(bank), "zq")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), f"resumed != uninterrupted: {history}"
    assert not list(root.glob(".kill.*")), "no lock or temp file is left"


def test_two_trainers_on_one_bank_keep_both_concepts(setup, tmp_path) -> None:
    root, first = setup
    bank = root / "shared.safetensors"
    bank.write_bytes(first.read_bytes())
    harness = _harness(tmp_path, pause=0.0)
    go = tmp_path / "go"
    a = _start(harness, _train_args(root, bank, "zq dog", "second"), hold=go)
    for line in a.stdout:
        if line.startswith("phase train"):  # a holds the bank, half-way through its work
            break
    b = _start(harness, _train_args(root, bank, "zz hat", "third"))
    _, b_err = b.communicate(timeout=600)
    assert b.returncode == 2 and f"in use by process {a.pid}" in b_err and "training 'zq'" in b_err, b_err
    go.touch()
    a.stdout.read()
    assert a.wait(600) == 0, a.stderr.read()
    assert ConceptBank.load(bank).names() == ["sks", "zq"]
    b = _start(harness, _train_args(root, bank, "zz hat", "third"))
    _, b_err = b.communicate(timeout=600)
    assert b.returncode == 0, b_err
    assert ConceptBank.load(bank).names() == ["sks", "zq", "zz"]
