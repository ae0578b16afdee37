"""tests/comfy in a Python without torch: every module is skipped with the documented reason, not an error;
under SEQLORA_COMFYUI_REQUIRED those skips fail the run instead.

The torch-less Python is this interpreter started with ``-S`` (no site-packages) and only pytest and
its dependencies on PYTHONPATH; COMFYUI_PATH names a stand-in checkout so that torch is what is missing.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
COMFY_TESTS = ROOT / "tests" / "comfy"
sys.path.insert(0, str(ROOT / "tools"))
from comfy_harness import SKIP_REASON  # noqa: E402

sys.path.remove(str(ROOT / "tools"))


def _link_distribution(name: str, into: Path, seen: set[str]) -> None:
    """Link the top-level modules of distribution `name` and of what it requires into `into`."""
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    dist = md.distribution(name)
    for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "__pycache__")}:
        src, dst = Path(dist.locate_file(top)), into / top
        if src.exists() and not dst.exists():
            dst.symlink_to(src, target_is_directory=src.is_dir())
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            _link_distribution(req.name, into, seen)


@pytest.fixture(scope="module")
def torchless(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, str]]:
    """(command prefix, environment) of a Python that has pytest but no torch."""
    lib = tmp_path_factory.mktemp("pytest_only")
    _link_distribution("pytest", lib, set())
    fake = tmp_path_factory.mktemp("fake") / "ComfyUI"
    (fake / "comfy").mkdir(parents=True)
    (fake / "main.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("SEQLORA_COMFYUI_REQUIRED", "PYTHONPATH")}
    env.update(PYTHONPATH=str(lib), COMFYUI_PATH=str(fake))
    cmd = [sys.executable, "-S"]
    probe = subprocess.run([*cmd, "-c", "import pytest, torch"], env=env, capture_output=True, text=True)
    assert "No module named 'torch'" in probe.stderr, probe.stderr  # pytest imports, torch does not
    return cmd, env


def run_comfy_tests(torchless: tuple[list[str], dict[str, str]], **extra_env: str) -> subprocess.CompletedProcess:
    cmd, env = torchless
    return subprocess.run(
        [*cmd, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/comfy"],
        cwd=ROOT,
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_torch_the_comfyui_tests_skip_with_the_documented_reason(torchless) -> None:
    res = run_comfy_tests(torchless)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    modules = sorted(p.name for p in COMFY_TESTS.glob("test_*.py"))
    for name in modules:
        assert f"SKIPPED [1] tests/comfy/{name}: torch is not installed in this Python: {SKIP_REASON}" in out, out
    assert f"{len(modules)} skipped" in out and "ERROR" not in out and "Error" not in out, out


def test_required_turns_those_skips_into_a_failure(torchless) -> None:
    res = run_comfy_tests(torchless, SEQLORA_COMFYUI_REQUIRED="1")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "SEQLORA_COMFYUI_REQUIRED is set but" in out, out
