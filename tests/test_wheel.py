"""The built wheel carries everything the demo loads: `pip install .` users get a working toy world."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# what the build needs; tests, benchmarks, docs and checkouts of other tools stay behind
_LEFT_OUT = (".git", ".venv*", "__pycache__", "*.pyc", "tests", "bench", "docs", "build", "dist", "*.egg-info")


def test_the_wheel_installs_a_toy_world_the_demo_can_load(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*_LEFT_OUT), symlinks=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    probe = (
        "import sys\n"
        "from seqlora_core.toy.model import WEIGHTS_DIR, load_toy_pipeline\n"
        "from seqlora_core.toy.identity import load_identity_classifier\n"
        "assert str(WEIGHTS_DIR).startswith(sys.argv[1]), WEIGHTS_DIR\n"
        "pipe = load_toy_pipeline()\n"
        "load_identity_classifier()\n"
        "print(type(pipe).__name__, pipe.unet.config.block_out_channels)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe, str(site)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("StableDiffusionPipeline"), out.stdout
