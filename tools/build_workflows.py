"""Regenerate the UI-format example workflows in ``workflows/`` from a live server's /object_info, then
copy them to ``example_workflows/`` (what ComfyUI's template browser reads) with ``sync_example_workflows``.

Usage: ``COMFYUI_PATH=/path/to/ComfyUI python tools/build_workflows.py`` (with the ComfyUI
environment's Python). The files are committed; tests load them as they are.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from comfy_harness import REPO_ROOT, SD15_CHECKPOINT, ComfyServer, UIGraph, validate_ui_workflow  # noqa: E402
from sync_example_workflows import sync  # noqa: E402

BANK_FILE = "my_concepts.safetensors"
NEGATIVE = "blurry, low quality"
TRAIN_DEFAULTS = ["seqlora", 4, 500, 1e-4, 0.05, "attn", 0, 1, "a photo of {trigger}", ""]
# The Train node as the editor draws it: its widgets, the loss chart under them (web/seqlora.js) and a
# margin; rows of a chain are this far apart, so no chart is hidden behind the next node
# (tools/workflow_thumbnails.py and tests/comfy/test_comfy_frontend.py check it in the real editor).
TRAIN_SIZE = (400, 640)
ROW = TRAIN_SIZE[1] + 120


def _note(g: UIGraph, text: str, pos: tuple[float, float], size: tuple[float, float] = (420, 220)) -> None:
    nid = len(g.nodes) + 1
    g.nodes.append(
        {
            "id": nid,
            "type": "Note",
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": nid - 1,
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {},
            "widgets_values": [text],
            "color": "#432",
            "bgcolor": "#653",
        }
    )


def _preview(
    g: UIGraph,
    ck: int,
    model: tuple[int, int],
    neg: int,
    prompt: str,
    x: float,
    y: float,
    width: int = 512,
    height: int = 512,
    save_prefix: str | None = None,
) -> int:
    pos = g.node("CLIPTextEncode", [prompt], pos=(x, y), size=(300, 100), title=f"prompt: {prompt}")
    lat = g.node("EmptyLatentImage", [width, height, 1], pos=(x, y + 150), size=(300, 110))
    ks = g.node("KSampler", [42, "fixed", 25, 7.0, "euler", "normal", 1.0], pos=(x + 330, y), size=(300, 270))
    dec = g.node("VAEDecode", [], pos=(x + 660, y), size=(200, 50))
    out = (
        g.node("SaveImage", [save_prefix], pos=(x + 660, y + 80), size=(320, 320))
        if save_prefix
        else g.node("PreviewImage", [], pos=(x + 660, y + 80), size=(320, 320))
    )
    g.link(ck, 1, pos, "clip")
    g.link(model[0], model[1], ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(ck, 2, dec, "vae")
    g.link(dec, 0, out, "images")
    return ks


def train_chain(info: dict[str, Any]) -> dict[str, Any]:
    """(a) three concepts trained one after another, each previewed with its trigger."""
    g = UIGraph(info)
    ck = g.node("CheckpointLoaderSimple", [SD15_CHECKPOINT], pos=(-420, 300), size=(360, 100))
    neg = g.node("CLIPTextEncode", [NEGATIVE], pos=(-420, 480), size=(360, 100), title="negative")
    g.link(ck, 1, neg, "clip")
    concepts = [("dog", "sks dog"), ("cat", "pqz cat"), ("hat", "wkr hat")]
    prev = None
    for i, (name, trigger) in enumerate(concepts):
        y = i * ROW
        folder = g.node(
            "SeqLoRAImageFolder", [f"seqlora/{name}", 512], pos=(0, y), size=(320, 110), title=f"images: {name}"
        )
        train = g.node(
            "SeqLoRATrainConcept",
            [name, trigger, *TRAIN_DEFAULTS],
            pos=(360, y),
            size=TRAIN_SIZE,
            title=f"train: {name}",
        )
        if prev is None:
            g.link(ck, 0, train, "model")
        else:
            g.link(prev, 1, train, "model")
        g.link(ck, 1, train, "clip")
        g.link(ck, 2, train, "vae")
        g.link(folder, 0, train, "images")
        g.link(folder, 1, train, "captions")
        if prev is not None:
            g.link(prev, 0, train, "bank")
        _preview(g, ck, (train, 1), neg, f"a photo of {trigger}", 820, y)
        prev = train
    bottom = len(concepts) * ROW
    save = g.node("SeqLoRASaveBank", [BANK_FILE.removesuffix(".safetensors"), True], pos=(820, bottom), size=(320, 110))
    rep = g.node("SeqLoRAInterferenceReport", [0.05], pos=(1180, bottom), size=(420, 420))
    g.link(prev, 0, save, "bank")
    g.link(prev, 0, rep, "bank")
    _note(
        g,
        "Train three concepts one after another (SeqLoRA).\n\nPut each concept's 3-20 images (with "
        "optional same-name .txt captions) in ComfyUI/input/seqlora/<name>. Each Train node takes the bank "
        "of the previous one; its MODEL output has every concept so far applied. Edit one concept and "
        "queue again: earlier concepts come from the cache, that concept and later ones retrain. Cancel "
        "any time; queue again to resume. The bank is saved to models/seqlora/my_concepts.safetensors.",
        (-420, -20),
    )
    return g.to_json()


def compose_regions(info: dict[str, Any]) -> dict[str, Any]:
    """(b) two concepts of a bank composed by summation, each prompt bound to its own area."""
    g = UIGraph(info)
    ck = g.node("CheckpointLoaderSimple", [SD15_CHECKPOINT], pos=(0, 0), size=(360, 100))
    loader = g.node("SeqLoRAMultiConceptLoader", [BANK_FILE, "dog:1, cat:1", "merged"], pos=(0, 160), size=(360, 200))
    g.link(ck, 0, loader, "model")
    texts = [("a photo of sks dog", (256, 512, 0, 0)), ("a photo of pqz cat", (256, 512, 256, 0))]
    areas = []
    for i, (text, (w, h, x, y)) in enumerate(texts):
        enc = g.node("CLIPTextEncode", [text], pos=(420, i * 260), size=(320, 100), title=f"region {i + 1}")
        area = g.node(
            "ConditioningSetArea",
            [w, h, x, y, 1.0],
            pos=(780, i * 260),
            size=(300, 160),
            title=f"region {i + 1}: {'left' if x == 0 else 'right'} half",
        )
        g.link(ck, 1, enc, "clip")
        g.link(enc, 0, area, "conditioning")
        areas.append(area)
    glob = g.node(
        "CLIPTextEncode",
        ["a dog and a cat sitting side by side in a park"],
        pos=(420, 520),
        size=(320, 100),
        title="whole image",
    )
    g.link(ck, 1, glob, "clip")
    comb1 = g.node("ConditioningCombine", [], pos=(1120, 60), size=(240, 50))
    comb2 = g.node("ConditioningCombine", [], pos=(1120, 200), size=(240, 50))
    g.link(areas[0], 0, comb1, "conditioning_1")
    g.link(areas[1], 0, comb1, "conditioning_2")
    g.link(comb1, 0, comb2, "conditioning_1")
    g.link(glob, 0, comb2, "conditioning_2")
    neg = g.node("CLIPTextEncode", [NEGATIVE], pos=(420, 680), size=(320, 100), title="negative")
    g.link(ck, 1, neg, "clip")
    lat = g.node("EmptyLatentImage", [512, 512, 1], pos=(1120, 320), size=(240, 110))
    ks = g.node("KSampler", [42, "fixed", 25, 7.0, "euler", "normal", 1.0], pos=(1400, 0), size=(300, 270))
    dec = g.node("VAEDecode", [], pos=(1740, 0), size=(200, 50))
    save = g.node("SaveImage", ["seqlora_regions"], pos=(1740, 80), size=(360, 380))
    g.link(loader, 0, ks, "model")
    g.link(comb2, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(ck, 2, dec, "vae")
    g.link(dec, 0, save, "images")
    _note(
        g,
        "Compose two concepts without fusion: the loader adds both concepts' deltas (W = W0 + sum s_t dW_t); "
        "each trigger prompt is bound to one half of the image with ConditioningSetArea (ConditioningSetMask "
        "works the same with a mask). Toggle concepts and strengths in the loader's list. Needs the bank "
        "from the 'train three concepts' workflow.",
        (0, 420),
        (360, 240),
    )
    return g.to_json()


def add_concept(info: dict[str, Any]) -> dict[str, Any]:
    """(c) one more concept learned into an existing bank, saved back, previewed and exported."""
    g = UIGraph(info)
    ck = g.node("CheckpointLoaderSimple", [SD15_CHECKPOINT], pos=(0, 0), size=(360, 100))
    load = g.node("SeqLoRALoadBank", [BANK_FILE], pos=(0, 150), size=(360, 80))
    folder = g.node("SeqLoRAImageFolder", ["seqlora/toy", 512], pos=(0, 280), size=(360, 110), title="images: toy")
    train = g.node(
        "SeqLoRATrainConcept", ["toy", "zxv toy", *TRAIN_DEFAULTS], pos=(400, 0), size=TRAIN_SIZE, title="train: toy"
    )
    g.link(ck, 0, train, "model")
    g.link(ck, 1, train, "clip")
    g.link(ck, 2, train, "vae")
    g.link(folder, 0, train, "images")
    g.link(folder, 1, train, "captions")
    g.link(load, 0, train, "bank")
    neg = g.node("CLIPTextEncode", [NEGATIVE], pos=(400, TRAIN_SIZE[1] + 80), size=(360, 100), title="negative")
    g.link(ck, 1, neg, "clip")
    _preview(g, ck, (train, 1), neg, "a photo of zxv toy", 840, 0)
    save = g.node("SeqLoRASaveBank", [BANK_FILE.removesuffix(".safetensors"), True], pos=(840, 460), size=(320, 110))
    export = g.node("SeqLoRAExportLoRA", ["", "", "fp16", True], pos=(840, 620), size=(320, 160))
    rep = g.node("SeqLoRAInterferenceReport", [0.05], pos=(1200, 460), size=(420, 420))
    for dst in (save, export, rep):
        g.link(train, 0, dst, "bank")
    _note(
        g,
        "Add a concept to an existing bank: the new concept's basis is learned orthogonal to every "
        "concept already in the bank, so they keep working when composed. The bank is saved back (the old "
        "file is kept as .bak) and the new concept is exported as a kohya LoRA into models/loras.",
        (0, 440),
        (360, 200),
    )
    return g.to_json()


WORKFLOWS = {
    "seqlora_train_three_concepts.json": train_chain,
    "seqlora_compose_regions.json": compose_regions,
    "seqlora_add_concept_to_bank.json": add_concept,
}


def main() -> int:
    out_dir = REPO_ROOT / "workflows"
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        (server.models / "checkpoints" / SD15_CHECKPOINT).write_bytes(b"")
        (server.models / "seqlora" / BANK_FILE).write_bytes(b"")
        info = server.object_info()
        for name, build in WORKFLOWS.items():
            wf = build(info)
            problems = validate_ui_workflow(wf, info)
            if problems:
                print(name, problems)
                return 1
            (out_dir / name).write_text(json.dumps(wf, indent=1) + "\n")
            print("wrote", out_dir / name)
    for path in sync():
        print("copied to", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
