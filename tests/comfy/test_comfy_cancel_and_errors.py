"""Through the headless server: cancel a training midway and resume it; bad inputs give clear node errors
and never damage what was saved."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from comfy_harness import (
    SD15_CHECKPOINT,
    EventRecorder,
    history_error,
    history_messages,
    make_images,
    sampler_graph,
)

pytestmark = pytest.mark.slow


def graph(
    folder: str = "seqlora/cancel",
    name: str = "resumed",
    steps: int = 200,
    rank: int = 4,
    concept: str = "cancel_me",
    bank_file: str | None = None,
) -> dict[str, Any]:
    """Checkpoint -> image folder -> train -> save bank (optionally training on top of a bank file)."""
    g: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CHECKPOINT}},
        "2": {"class_type": "SeqLoRAImageFolder", "inputs": {"folder": folder, "resolution": 64}},
        "3": {
            "class_type": "SeqLoRATrainConcept",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "images": ["2", 0],
                "captions": ["2", 1],
                "concept_name": concept,
                "trigger_words": "sks thing",
                "method": "seqlora",
                "rank": rank,
                "steps": steps,
                "learning_rate": 1e-3,
                "interference_budget": 0.05,
                "target_preset": "attn",
                "seed": 3,
                "batch_size": 1,
                "caption_template": "a photo of {trigger}",
            },
        },
        "4": {"class_type": "SeqLoRASaveBank", "inputs": {"bank": ["3", 0], "name": name, "overwrite": True}},
    }
    if bank_file:
        g["5"] = {"class_type": "SeqLoRALoadBank", "inputs": {"bank_file": bank_file}}
        g["3"]["inputs"]["bank"] = ["5", 0]
    return g


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def images(comfy_server) -> None:
    make_images(comfy_server.input_dir / "seqlora" / "cancel", 2, size=64, seed=11, color=(10, 200, 10))


@pytest.fixture(scope="module")
def resumed(comfy_server, images) -> dict[str, Any]:
    """Queue a 200-step training, interrupt it after a few steps, queue it again."""
    g = graph()
    autosave = comfy_server.models / "seqlora" / ".autosave"
    with EventRecorder(comfy_server) as rec:
        pid = comfy_server.submit(g, client_id=rec.client_id)["prompt_id"]
        _, first = rec.wait_for(lambda e, d: e == "seqlora.loss" and d.get("step", 0) >= 3, timeout=1200)
        comfy_server.interrupt()
        entry = comfy_server.wait(pid, timeout=600)
        cut = max(d["step"] for d in rec.of("seqlora.loss"))
    checkpoints = sorted(autosave.glob("*.checkpoint"))
    with EventRecorder(comfy_server) as rec2:
        entry2 = comfy_server.run(g, client_id=rec2.client_id, timeout=1800)
        rec2.wait_for(lambda e, d: e == "executing" and d.get("node") is None, timeout=30)
    return {
        "first": entry,
        "cut": cut,
        "checkpoints": checkpoints,
        "second": entry2,
        "steps2": [d["step"] for d in rec2.of("seqlora.loss")],
        "autosave": autosave,
    }


def test_cancel_keeps_a_checkpoint(resumed) -> None:
    names = [m for m, _ in history_messages(resumed["first"])]
    assert "execution_interrupted" in names, names
    assert resumed["cut"] >= 3
    assert resumed["checkpoints"], "an interrupted training leaves its checkpoint in models/seqlora/.autosave"


def test_requeue_resumes_and_finishes(comfy_server, resumed) -> None:
    assert resumed["second"]["status"]["status_str"] == "success", history_error(resumed["second"])
    steps = resumed["steps2"]
    assert steps and min(steps) > 1 and max(steps) == 200, f"resumed run reported steps {steps}"
    assert min(steps) >= resumed["cut"], "the resumed run starts where the cancelled one stopped"
    from seqlora_core.method.bank import ConceptBank

    bank = ConceptBank.load(comfy_server.models / "seqlora" / "resumed.safetensors")
    assert bank.names() == ["cancel_me"] and len(bank.concepts[0].loss_curve) == 200
    assert not list(resumed["autosave"].glob("*.checkpoint")), "a finished training removes its checkpoint"


def _error_of(server, g: dict[str, Any]) -> dict[str, Any]:
    entry = server.run(g, timeout=1200)
    err = history_error(entry)
    assert entry["status"]["status_str"] == "error" and err is not None
    return err


def test_missing_image_folder_is_a_clear_node_error(comfy_server, resumed) -> None:
    before = digest(comfy_server.models / "seqlora")
    err = _error_of(comfy_server, graph(folder="seqlora/does_not_exist", name="never"))
    assert err["node_type"] == "SeqLoRAImageFolder"
    assert "image folder not found" in err["exception_message"]
    assert digest(comfy_server.models / "seqlora") == before


def test_empty_concept_name_is_a_clear_node_error(comfy_server, resumed) -> None:
    before = digest(comfy_server.models / "seqlora")
    err = _error_of(comfy_server, graph(concept="   ", name="never"))
    assert err["node_type"] == "SeqLoRATrainConcept" and "concept_name: empty" in err["exception_message"]
    assert digest(comfy_server.models / "seqlora") == before


@pytest.mark.parametrize("rank", [0, 500])
def test_rank_out_of_range_is_refused_at_queue_time(comfy_server, rank) -> None:
    status, body = comfy_server.post("/prompt", {"prompt": graph(rank=rank), "client_id": "x"})
    assert status == 400
    errors = body["node_errors"]["3"]["errors"]
    assert any(e["extra_info"]["input_name"] == "rank" for e in errors), errors


def _foreign_bank(path: Path, architecture: str, layer: str) -> None:
    from seqlora_core.method.bank import Concept, ConceptBank, ConceptLayer
    from seqlora_core.method.targets import LayerSpec

    spec = LayerSpec(layer, "linear", 320, 320)
    cl = ConceptLayer(torch.linalg.qr(torch.randn(320, 4))[0].T.contiguous(), torch.randn(320, 4) * 0.01)
    bank = ConceptBank([spec], "ldm", architecture, {}, [Concept("alien", ["zz alien"], 4, "seqlora", {layer: cl})])
    bank.save(path)


@pytest.mark.parametrize(
    "arch,layer,message",
    [
        ("SDXL", "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "trained on SDXL"),
        ("SD15", "middle_block.1.transformer_blocks.0.attn1.to_q", "does not fit the model"),
    ],
    ids=["other-architecture", "other-layers"],
)
def test_bank_from_another_model_is_a_clear_node_error(comfy_server, resumed, arch, layer, message) -> None:
    folder = comfy_server.models / "seqlora"
    _foreign_bank(folder / f"foreign_{arch}.safetensors", arch, layer)
    before = digest(folder)
    err = _error_of(
        comfy_server, graph(name="never", concept="other", bank_file=f"foreign_{arch}.safetensors", steps=2)
    )
    assert err["node_type"] == "SeqLoRATrainConcept" and message in err["exception_message"]
    loader = {
        **sampler_graph(SD15_CHECKPOINT, ["2", 0], prompt="x", seed=1, output="PreviewImage"),
        "2": {
            "class_type": "SeqLoRAMultiConceptLoader",
            "inputs": {"model": ["1", 0], "bank_file": f"foreign_{arch}.safetensors", "concepts": "", "mode": "merged"},
        },
    }
    err = _error_of(comfy_server, loader)
    assert err["node_type"] == "SeqLoRAMultiConceptLoader" and message in err["exception_message"]
    assert digest(folder) == before, "a failed run changes no saved bank"


def test_save_without_overwrite_keeps_the_file_and_takes_a_new_name(comfy_server, resumed) -> None:
    folder = comfy_server.models / "seqlora"
    before = digest(folder)
    g = {
        "1": {"class_type": "SeqLoRALoadBank", "inputs": {"bank_file": "resumed.safetensors"}},
        "2": {"class_type": "SeqLoRASaveBank", "inputs": {"bank": ["1", 0], "name": "resumed", "overwrite": False}},
    }
    entry = comfy_server.run(g, timeout=600)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    after = digest(folder)
    assert {k: after[k] for k in before} == before, "no existing bank changed"
    new = sorted(set(after) - set(before))
    assert len(new) == 1 and new[0].startswith("resumed_0") and new[0].endswith(".safetensors"), new
