"""Thumbnails for ComfyUI's template browser: each example workflow as the real editor draws it.

The template browser shows ``<name>.jpg`` beside ``<name>.json`` in a pack's ``example_workflows/``. This
starts a headless ComfyUI with the pack, opens its web app in headless Chromium, loads each workflow of
``workflows/``, fits it into view, and writes the canvas as ``workflows/<name>.jpg``; then copies them to
``example_workflows/`` with ``sync_example_workflows``. It also refuses a workflow whose nodes overlap or
are smaller than their widgets need (what ``tests/comfy/test_comfy_frontend.py`` checks).

    COMFYUI_PATH=/path/to/ComfyUI python tools/workflow_thumbnails.py
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from comfy_harness import REPO_ROOT, SD15_CHECKPOINT, ComfyServer, comfy_page, node_boxes, overlaps  # noqa: E402
from sync_example_workflows import sync  # noqa: E402

WIDTH = 640  # thumbnail width in pixels (the browser shows them at about 300)
MARGIN = 24  # screen pixels around the workflow


def layout_problems(boxes: list[dict]) -> list[str]:
    """Nodes that overlap, or that are smaller than their widgets need (their last widgets would be cut)."""
    out = [f"nodes {a} and {b} overlap" for a, b in overlaps(boxes)]
    out += [
        f"node {b['id']} ({b['type']}) is {b['w']:.0f}x{b['body_h']:.0f}, its widgets need "
        f"{b['need_w']:.0f}x{b['need_h']:.0f}"
        for b in boxes
        if b["need_w"] > b["w"] + 1 or b["need_h"] > b["body_h"] + 1
    ]
    return out


def fit_and_shoot(cdp, boxes: list[dict]) -> bytes:
    """Scale and move the canvas so every node shows, and return a PNG of the canvas element."""
    rect = cdp.js(
        "(() => { const r = app.canvas.canvas.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()"
    )
    x0, y0 = min(b["x"] for b in boxes), min(b["y"] for b in boxes)
    x1, y1 = max(b["x"] + b["w"] for b in boxes), max(b["y"] + b["h"] for b in boxes)
    scale = min((rect[2] - 2 * MARGIN) / (x1 - x0), (rect[3] - 2 * MARGIN) / (y1 - y0))
    cdp.js(
        f"app.canvas.ds.scale = {scale}; app.canvas.ds.offset = [{MARGIN / scale - x0}, {MARGIN / scale - y0}];"
        "app.canvas.show_info = false; app.canvas.render_info = false;"  # no frame-rate overlay
        "app.canvas.low_quality_zoom_threshold = 0; app.canvas.low_quality_threshold = 0;"  # draw titles and widgets
        "app.graph.setDirtyCanvas(true, true); true"
    )
    time.sleep(1.0)
    width, height = (x1 - x0) * scale + 2 * MARGIN, (y1 - y0) * scale + 2 * MARGIN
    clip = {"x": rect[0], "y": rect[1], "width": min(width, rect[2]), "height": min(height, rect[3]), "scale": 1}
    import base64

    return base64.b64decode(cdp.call("Page.captureScreenshot", format="png", clip=clip)["data"])


def main() -> int:
    from PIL import Image

    source = REPO_ROOT / "workflows"
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        (server.models / "checkpoints" / SD15_CHECKPOINT).write_bytes(b"")
        (server.models / "seqlora" / "my_concepts.safetensors").write_bytes(b"")
        with comfy_page(server, Path(tmp) / "chromium", size=(2400, 2600)) as cdp:
            for path in sorted(source.glob("*.json")):
                boxes = node_boxes(cdp, json.loads(path.read_text()))
                problems = layout_problems(boxes)
                if problems:
                    print(path.name, problems)
                    return 1
                img = Image.open(io.BytesIO(fit_and_shoot(cdp, boxes))).convert("RGB")
                img = img.resize((WIDTH, round(img.height * WIDTH / img.width)), Image.LANCZOS)
                out = path.with_suffix(".jpg")
                img.save(out, "JPEG", quality=85, optimize=True)
                print("wrote", out.relative_to(REPO_ROOT), img.size)
    for p in sync():
        print("copied to", p.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
