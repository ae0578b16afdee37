"""Fixtures for the Automatic1111/Forge tests; they skip, saying why, when A1111_PATH / FORGE_PATH are unset.

Run from the repository root with the project's Python (the hosts run in their own venvs):

    A1111_PATH=/opt/a1111 FORGE_PATH=/opt/forge python -m pytest tests/a1111 -v

Prepare the checkouts once with ``python tests/a1111/prepare.py a1111|forge <folder>``. The random
checkpoints are built on first use with A1111's own ldm (the Forge tests need A1111_PATH for that too,
or ``SEQLORA_SD15_CHECKPOINT`` naming an SD1.5-layout file) and cached under ``SEQLORA_TEST_CACHE``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from webui_harness import WebUI, build_checkpoint, free_port, host_from_env, prepare_data_dir

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the host tests up front when their checkout is not named; the reason says what to set."""
    a1111, why_a = host_from_env("a1111")
    forge, why_f = host_from_env("forge")
    sd15 = os.environ.get("SEQLORA_SD15_CHECKPOINT", "").strip()
    for item in items:
        path = Path(str(item.fspath))
        if HERE not in path.parents:
            continue
        if path.name.startswith("test_a1111") and a1111 is None:
            item.add_marker(pytest.mark.skip(reason=why_a))
        elif path.name.startswith("test_forge"):
            if forge is None:
                item.add_marker(pytest.mark.skip(reason=why_f))
            elif a1111 is None and not sd15:
                item.add_marker(
                    pytest.mark.skip(
                        reason="the Forge tests build their SD1.5-layout checkpoint with A1111's ldm: set A1111_PATH "
                        "too, or SEQLORA_SD15_CHECKPOINT to an SD1.5-layout .safetensors file"
                    )
                )


@pytest.fixture(scope="session")
def a1111_host():
    host, why = host_from_env("a1111")
    if host is None:
        pytest.skip(why)
    return host


@pytest.fixture(scope="session")
def forge_host():
    host, why = host_from_env("forge")
    if host is None:
        pytest.skip(why)
    return host


@pytest.fixture(scope="session")
def tiny_checkpoint(a1111_host) -> Path:
    return build_checkpoint(a1111_host, "tiny")


@pytest.fixture(scope="session")
def sd15_checkpoint() -> Path:
    given = os.environ.get("SEQLORA_SD15_CHECKPOINT", "").strip()
    if given:
        return Path(given).resolve()
    host, why = host_from_env("a1111")
    if host is None:
        pytest.skip(why)
    return build_checkpoint(host, "sd15")


@pytest.fixture(scope="session")
def concept_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small concept folders (noise images with and without captions)."""
    import sys

    sys.path.insert(0, str(HERE.parent))
    from _images import concept_folder

    root = tmp_path_factory.mktemp("concepts")
    return {
        "dog": concept_folder(
            root / "dog", [(48, 40), (40, 48), (64, 64)], ["a dog on grass", None, "sks dog sitting"]
        ),
        "hat": concept_folder(root / "hat", [(40, 40), (56, 48)]),
    }


@pytest.fixture(scope="module")
def a1111(a1111_host, tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """A1111 in UI mode (gradio + API) on the tiny checkpoint, with this extension and the probe."""
    data = prepare_data_dir(tmp_path_factory.mktemp("a1111_data"), tiny_checkpoint)
    server = WebUI(a1111_host, data, free_port(), data / "logs" / "a1111.log")
    server.start(data / "models" / "Stable-diffusion" / tiny_checkpoint.name, ui=True)
    yield server
    server.stop()
    keep = os.environ.get("SEQLORA_KEEP_LOGS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "a1111.log").write_text(server.log(), encoding="utf-8")


@pytest.fixture(scope="module")
def forge(forge_host, sd15_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """Forge in UI mode (gradio 4 + API) on the random full-size SD1.5 checkpoint."""
    data = prepare_data_dir(tmp_path_factory.mktemp("forge_data"), sd15_checkpoint)
    server = WebUI(forge_host, data, free_port(), data / "logs" / "forge.log")
    server.start(data / "models" / "Stable-diffusion" / sd15_checkpoint.name, ui=True)
    yield server
    server.stop()
    keep = os.environ.get("SEQLORA_KEEP_LOGS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "forge.log").write_text(server.log(), encoding="utf-8")
