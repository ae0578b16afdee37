"""Findings from a real ComfyUI, each fixed and checked there: absurd loader strengths are a clear node error
(through the server, as the browser sends them), a cancelled training whose settings changed is pruned
from the autosaves with a notice that it restarts, and skipped images are listed with why on the Image Folder
node."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from comfy_harness import SD15_CHECKPOINT, history_error, make_images, sampler_graph
from PIL import Image

pytestmark = pytest.mark.slow
TRAIN = "SeqLoRATrainConcept"


def _loader_graph(bank_file: str, concepts: str) -> dict:
    loader = {"model": ["1", 0], "bank_file": bank_file, "concepts": concepts, "mode": "merged"}
    return {
        **sampler_graph(SD15_CHECKPOINT, ["2", 0], prefix="strength"),
        "2": {"class_type": "SeqLoRAMultiConceptLoader", "inputs": loader},
    }


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf", "1e9", "-25"])
def test_absurd_strengths_are_a_clear_node_error(comfy_server, strength: str) -> None:
    from seqlora_core.method.bank import Concept, ConceptBank, ConceptLayer
    from seqlora_core.method.targets import LayerSpec

    layer = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    a = torch.linalg.qr(torch.randn(320, 4, dtype=torch.float64))[0].T.float().contiguous()
    bank = ConceptBank(
        [LayerSpec(layer, "linear", 320, 320)],
        "ldm",
        "sd15",
        {},
        [Concept("dog", ["sks dog"], 4, "seqlora", {layer: ConceptLayer(a, 0.01 * torch.randn(320, 4))})],
    )
    bank.save(comfy_server.models / "seqlora" / "strengths.safetensors")
    entry = comfy_server.run(_loader_graph("strengths.safetensors", f"dog:{strength}"), timeout=600)
    err = history_error(entry)
    assert entry["status"]["status_str"] == "error" and err is not None
    assert err["node_type"] == "SeqLoRAMultiConceptLoader"
    message = err["exception_message"]
    assert message.startswith("concepts: strength") and "'dog'" in message and "dog:1.0" in message
    ok = comfy_server.run(_loader_graph("strengths.safetensors", "dog:1.5"), timeout=600)
    assert ok["status"]["status_str"] == "success", history_error(ok)


def _train(pack, tiny_loaded, images, captions, lr: float, steps: int = 8) -> dict:
    model, clip, vae = tiny_loaded
    with torch.inference_mode():
        return pack.NODE_CLASS_MAPPINGS[TRAIN]().run(
            model,
            clip,
            vae,
            images,
            "stale",
            "zq stale",
            "seqlora",
            4,
            steps,
            lr,
            0.05,
            "attn",
            5,
            1,
            "a photo of {trigger}",
            None,
            captions,
            unique_id="stale-node",
        )


def test_a_changed_setting_after_a_cancel_prunes_the_old_progress_and_says_so(
    pack, tiny_loaded, comfy_models: Path
) -> None:
    import comfy.model_management as mm
    import comfy.utils

    make_images(comfy_models / "input" / "seqlora" / "stale", 2, size=64, seed=9, color=(20, 160, 200))
    with torch.inference_mode():
        images, captions, _ = pack.NODE_CLASS_MAPPINGS["SeqLoRAImageFolder"]().run("seqlora/stale", 64)["result"]
    autosave = comfy_models / "seqlora" / ".autosave"

    def interrupt_at_3(value, total, preview, node_id=None):
        if value == 3 and node_id == "stale-node":
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(interrupt_at_3)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(pack, tiny_loaded, images, captions, 1e-3)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    cancelled = list(autosave.glob("stale-*.checkpoint"))
    assert len(cancelled) == 1

    out = _train(pack, tiny_loaded, images, captions, 2e-3)  # another learning rate: cannot resume
    notes = out["ui"]["text"]
    assert len(notes) == 1 and "restarts from step 1" in notes[0] and "at step 3" in notes[0], notes
    assert len(out["result"][2]["loss"]) == 8
    assert not cancelled[0].exists(), "the stale checkpoint is gone"
    assert not list(autosave.glob("stale-*.checkpoint"))
    again = _train(pack, tiny_loaded, images, captions, 2e-3)  # unchanged: reused, nothing to say
    assert again["ui"]["text"] == []


def test_skipped_images_are_listed_with_why_on_the_image_folder_node(pack, comfy_models: Path, monkeypatch) -> None:
    folder = make_images(comfy_models / "input" / "seqlora" / "broken", 2, size=64, seed=4)
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.jpg").write_bytes(b"plain text")
    Image.new("RGB", (96, 96)).save(folder / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 96 // 3)  # over twice the limit: a decompression bomb
    with torch.inference_mode():
        out = pack.NODE_CLASS_MAPPINGS["SeqLoRAImageFolder"]().run("seqlora/broken", 64)
    text = out["ui"]["text"][0]
    assert out["result"][2] == 2
    assert text.startswith("2 images; skipped 3 files:")
    assert "truncated.png: unreadable" in text and "notes.jpg: unreadable" in text
    assert "big.png: too large" in text and "downscale it" in text, "a big image is not called unreadable"
    assert str(folder) not in text, "no absolute path on the node"
