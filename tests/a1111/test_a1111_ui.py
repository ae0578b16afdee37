"""The tab and the accordion as a browser shows them: headless Chromium on a real A1111 page.

A first server (API only) trains two concepts into a bank; a second one starts with that bank (and the
accordion opened, as saved UI defaults), and Chromium renders the txt2img page and the SeqLoRA tab:
the DOM must hold the accordion, its concept rows (drawn by ``javascript/seqlora.js``) and the tab's
bank table, and the screenshots must show a page. ``SEQLORA_SCREENSHOT_DIR`` keeps the PNGs;
``SEQLORA_CHROMIUM`` names the browser when it is not on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from webui_harness import WebUI, free_port, prepare_data_dir

CHROMIUM = (
    os.environ.get("SEQLORA_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
    or shutil.which("google-chrome")
)
BANK = "my_concepts.safetensors"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium/google-chrome on PATH (or set SEQLORA_CHROMIUM to a Chromium binary)"
    ),
]


def chromium(url: str, out: Path | None, size: str = "1360,1100", budget_ms: int = 60000) -> str:
    """Load `url` headless; write a screenshot to `out` (when given) and return the rendered DOM."""
    base = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--mute-audio",
        f"--window-size={size}",
        f"--virtual-time-budget={budget_ms}",
        "--run-all-compositor-stages-before-draw",
    ]
    if out is not None:
        subprocess.run([*base, f"--screenshot={out}", url], check=True, capture_output=True, timeout=600)
    dom = subprocess.run([*base, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=600)
    return dom.stdout


@pytest.fixture(scope="module")
def ui_server(a1111_host, tiny_checkpoint, concept_images, tmp_path_factory):
    data = prepare_data_dir(tmp_path_factory.mktemp("a1111_ui"), tiny_checkpoint)
    trainer = WebUI(a1111_host, data, free_port(), data / "logs" / "train.log")
    trainer.start(data / "models" / "Stable-diffusion" / tiny_checkpoint.name, ui=False)
    try:
        for name, trig, folder in [("sks", "sks dog", "dog"), ("zqx", "zqx hat", "hat")]:
            trainer.ok(
                "POST",
                "/seqlora/v1/train",
                {
                    "bank": BANK,
                    "name": name,
                    "triggers": trig,
                    "steps": 10,
                    "images": str(concept_images[folder]),
                    "resolution": 64,
                },
            )
            t0 = time.monotonic()
            while trainer.ok("GET", "/seqlora/v1/train/status")["state"] in ("queued", "running"):
                assert time.monotonic() - t0 < 900
                time.sleep(1)
            assert trainer.ok("GET", "/seqlora/v1/train/status")["state"] == "done"
    finally:
        trainer.stop()
    (data / "ui-config.json").write_text(
        json.dumps(
            {
                "customscript/seqlora.py/txt2img/SeqLoRA/value": True,
                "customscript/seqlora.py/txt2img/Concepts (name:strength, !off:strength)/value": "sks:1, zqx:0.7",
                "txt2img/Prompt/value": "a photo of sks dog wearing zqx hat",
            }
        )
    )
    server = WebUI(a1111_host, data, free_port(), data / "logs" / "ui.log")
    server.start(data / "models" / "Stable-diffusion" / tiny_checkpoint.name, ui=True)
    yield server
    server.stop()


def _shot_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("SEQLORA_SCREENSHOT_DIR") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _looks_like_a_page(png: Path) -> None:
    from PIL import Image

    img = Image.open(png).convert("L")
    lo, hi = img.getextrema()
    assert img.size[0] >= 800 and hi - lo > 100, (img.size, lo, hi)


def test_accordion_renders_with_its_concepts(ui_server: WebUI, tmp_path):
    png = _shot_dir(tmp_path) / "a1111_txt2img_accordion.png"
    dom = chromium(ui_server.url + "/?__theme=light", png)
    assert 'id="seqlora_txt2img"' in dom
    assert 'class="seqlora-row"' in dom, "javascript/seqlora.js did not draw the concept rows"
    assert dom.count('class="seqlora-row"') == 4 and "zqx hat" in dom  # two concepts in txt2img and in img2img
    ticked = re.findall(r'class="seqlora-row"[^>]*><input type="checkbox" checked=""', dom)
    assert len(ticked) == 2, "the saved txt2img selection 'sks:1, zqx:0.7' is not ticked in its rows"
    _looks_like_a_page(png)


def test_tab_renders_with_the_bank(ui_server: WebUI, tmp_path):
    png = _shot_dir(tmp_path) / "a1111_seqlora_tab.png"
    dom = chromium(ui_server.url + "/?__theme=light&seqlora_shot=tab", png)
    assert 'id="tab_seqlora_tab"' in dom and 'id="seqlora_train"' in dom
    assert "my_concepts.safetensors" in dom and "sks dog" in dom and "zqx hat" in dom
    _looks_like_a_page(png)
