"""Fixtures for the ComfyUI tests; every one of them skips when COMFYUI_PATH is not usable.

Run with the ComfyUI environment's Python:
``COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/comfy -q``.
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything here `comfyui` and skip it up front when ComfyUI is not available."""
    here = Path(__file__).parent
    why = missing_requirements()
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.comfyui)
            if why is not None:
                item.add_marker(pytest.mark.skip(reason=why))


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
