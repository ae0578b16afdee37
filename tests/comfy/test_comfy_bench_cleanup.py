"""bench/comfy_trainer_ratio.py removes its temp folder (the tiny checkpoint, ~280 MB) after a run, an error,
Ctrl-C and SIGTERM. Each case runs the real script in a child process with its own TMPDIR."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from comfy_harness import REPO_ROOT

pytestmark = pytest.mark.slow

SCRIPT = REPO_ROOT / "bench" / "comfy_trainer_ratio.py"
PREFIX = "seqlora-bench-"


def start(tmp: Path, *args: str) -> subprocess.Popen:
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--threads", "1", *args],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600.0) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the benchmark did not end within {timeout:.0f} s:\n{out[-4000:]}")
    return out


def left_behind(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob(PREFIX + "*"))


def test_a_full_run_removes_its_temp_folder(tmp_path: Path) -> None:
    proc = start(tmp_path, "--steps", "3")
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    rows = [line.split() for line in out.splitlines() if line.startswith(("comfyui_TrainLoraNode", "seqlora_node["))]
    assert len(rows) == 3, out[-4000:]  # ComfyUI's trainer, a first and a second SeqLoRA concept
    for row in rows[1:]:  # each SeqLoRA row ends in its ratios "per step / total", measured
        assert row[-2] == "/" and float(row[-3]) > 0 and float(row[-1]) > 0, row
    assert left_behind(tmp_path) == []


def test_an_error_removes_its_temp_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint.safetensors"
    proc = start(tmp_path, "--checkpoint", str(missing))
    out = finish(proc)
    assert proc.returncode not in (0, 2), out[-4000:]  # 2: ComfyUI not usable, the run never started
    assert str(missing) in out, out[-4000:]
    assert left_behind(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_removes_its_temp_folder(tmp_path: Path, sig: signal.Signals) -> None:
    proc = start(tmp_path, "--steps", "100000")
    deadline = time.monotonic() + 300
    built: list[Path] = []
    while not built and time.monotonic() < deadline and proc.poll() is None:
        built = list(tmp_path.glob(f"{PREFIX}*/sd15.safetensors"))  # the checkpoint it builds
        time.sleep(0.2)
    if not built:
        proc.kill()
        pytest.fail(f"the benchmark never built its tiny checkpoint in {tmp_path}:\n{finish(proc)[-4000:]}")
    assert built[0].stat().st_size > 100_000_000  # the file the finding was about
    proc.send_signal(sig)
    out = finish(proc, timeout=120)
    assert proc.returncode != 0, out[-4000:]
    assert left_behind(tmp_path) == [], out[-4000:]
