"""Fixtures for the ComfyUI tests; every test module here is skipped whole when COMFYUI_PATH is not usable.

Run with the ComfyUI environment's Python:
``COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/comfy -q``.
With ``SEQLORA_COMFYUI_REQUIRED=1`` (as CI sets it) any skip in this folder fails the run instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # comfy_harness

from comfy_harness import (  # noqa: E402
    SD15_CHECKPOINT,
    ComfyServer,
    build_tiny_checkpoint,
    load_pack,
    missing_requirements,
    setup_inprocess,
)

TINY_SEED = 0
TINY_VERSION = 1  # bump when the tiny recipe changes


HERE = Path(__file__).resolve().parent
REQUIRED_ENV = "SEQLORA_COMFYUI_REQUIRED"


class _ComfyUIUnavailable(pytest.Module):
    """A test module of this folder where ComfyUI cannot run: skipped whole, never imported.

    Importing it could fail first (the modules import torch), which would turn the skip into an error.
    """

    def collect(self):
        pytest.skip(missing_requirements() or "ComfyUI is not available")


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if missing_requirements() is None or HERE not in module_path.resolve().parents:
        return None
    return _ComfyUIUnavailable.from_parent(parent, path=module_path)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Report a skipped module under its own name rather than at the line of this file that skipped it."""
    report = yield
    if isinstance(collector, _ComfyUIUnavailable) and report.skipped and isinstance(report.longrepr, tuple):
        report.longrepr = (str(collector.path), None, report.longrepr[2])
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything here `comfyui`."""
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.comfyui)


def _required() -> bool:
    return os.environ.get(REQUIRED_ENV, "").strip() not in ("", "0")


_SKIPPED: list[str] = []


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and HERE in Path(str(report.fspath)).resolve().parents:
        _SKIPPED.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Skipped ComfyUI tests pass a run (even when their modules were all there was to collect), except
    under SEQLORA_COMFYUI_REQUIRED, where they fail it: the tier must really run."""
    if not _SKIPPED or session.exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        return
    session.exitstatus = pytest.ExitCode.TESTS_FAILED if _required() else pytest.ExitCode.OK


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _required() and _SKIPPED:
        terminalreporter.write_line(
            f"{REQUIRED_ENV} is set but {len(_SKIPPED)} ComfyUI test(s) were skipped (reasons below): failing the run",
            red=True,
        )


def _cache_dir() -> Path:
    base = os.environ.get("SEQLORA_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seqlora", "tests"
    )
    return Path(base)


@pytest.fixture(scope="session")
def comfy_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary models/output root registered with the in-process ComfyUI."""
    return tmp_path_factory.mktemp("comfy_models")


@pytest.fixture(scope="session")
def comfyui(comfy_models: Path) -> Path:
    """ComfyUI imported in-process on CPU; returns its checkout path."""
    return setup_inprocess(comfy_models)


@pytest.fixture(scope="session")
def pack(comfyui: Path):
    """This repository loaded as a custom-node package inside the in-process ComfyUI."""
    return load_pack()


@pytest.fixture(scope="session")
def tiny_checkpoint(comfyui: Path) -> Path:
    """The tiny SD1.5-detected checkpoint (built once from a fixed seed, cached outside the repo)."""
    path = _cache_dir() / f"tiny-sd15-v{TINY_VERSION}-seed{TINY_SEED}.safetensors"
    return build_tiny_checkpoint(path, seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint: Path):
    """(MODEL patcher, CLIP, VAE) of the tiny checkpoint, loaded in-process."""
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


@pytest.fixture(scope="session")
def comfy_server(
    tmp_path_factory: pytest.TempPathFactory, comfyui: Path, tiny_checkpoint: Path
) -> Iterator[ComfyServer]:
    """A headless ComfyUI server with this pack installed and the tiny checkpoint as the SD1.5 file."""
    root = tmp_path_factory.mktemp("comfy_server")
    server = ComfyServer(root, comfy_path=comfyui)
    server.prepare()
    target = server.models / "checkpoints" / SD15_CHECKPOINT
    try:
        target.symlink_to(tiny_checkpoint)
    except OSError:
        shutil.copy2(tiny_checkpoint, target)
    server.start()
    try:
        yield server
    finally:
        server.stop()
