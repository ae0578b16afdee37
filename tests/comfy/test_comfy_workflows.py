"""End to end through a headless ComfyUI server: the example workflows, caching, cancel/resume, errors.

Each workflow is loaded from ``workflows/`` (UI format), validated against the live /object_info,
converted to the API format and shrunk (64 px, a few steps) before it runs on the tiny checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from comfy_harness import (
    REPO_ROOT,
    EventRecorder,
    history_error,
    load_workflow,
    make_images,
    ui_to_api,
    validate_ui_workflow,
)

pytestmark = pytest.mark.slow

WF = REPO_ROOT / "workflows"
CHAIN = WF / "seqlora_train_three_concepts.json"
REGIONS = WF / "seqlora_compose_regions.json"
ADD = WF / "seqlora_add_concept_to_bank.json"
BANK = "my_concepts.safetensors"
TRAIN = "SeqLoRATrainConcept"
TRAIN_STEPS = 3


def shrink(api: dict[str, Any], train_steps: int = TRAIN_STEPS, px: int = 64) -> dict[str, Any]:
    """Make a workflow cheap: tiny images and latents, one sampling step, a few training steps."""
    for node in api.values():
        inp, ct = node["inputs"], node["class_type"]
        if ct == TRAIN:
            inp["steps"] = train_steps
            inp["learning_rate"] = 1e-3
        elif ct == "SeqLoRAImageFolder":
            inp["resolution"] = px
        elif ct == "EmptyLatentImage":
            inp["width"], inp["height"] = (2 * px, px) if _has_areas(api) else (px, px)
        elif ct == "KSampler":
            inp["steps"] = 1
        elif ct == "ConditioningSetArea":
            inp["width"], inp["height"] = px, px
            inp["x"], inp["y"] = (0 if inp["x"] == 0 else px), 0
    return api


def _has_areas(api: dict[str, Any]) -> bool:
    return any(n["class_type"] == "ConditioningSetArea" for n in api.values())


def ids_of(api: dict[str, Any], class_type: str) -> list[str]:
    return sorted((k for k, v in api.items() if v["class_type"] == class_type), key=int)


def run_ok(server, api, workflow=None, timeout=1800) -> tuple[dict, EventRecorder]:
    rec = EventRecorder(server)
    try:
        entry = server.run(api, client_id=rec.client_id, workflow=workflow, timeout=timeout)
        assert entry["status"]["status_str"] == "success", json.dumps(history_error(entry), indent=1)[:3000]
        rec.wait_for(lambda e, d: e == "executing" and d.get("node") is None, timeout=30)
    finally:
        rec.close()
    return entry, rec


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def info(comfy_server) -> dict[str, Any]:
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def concept_images(comfy_server) -> Path:
    root = comfy_server.input_dir / "seqlora"
    colours = {"dog": (200, 120, 40), "cat": (40, 40, 40), "hat": (30, 90, 200), "toy": (220, 30, 160)}
    for i, (name, colour) in enumerate(colours.items()):
        make_images(root / name, 2, size=64, seed=i, color=colour, caption=None if name == "cat" else f"a {name}")
    return root


@pytest.fixture(scope="module")
def chain_run(comfy_server, info, concept_images):
    """Workflow (a) run once; later tests reuse its bank file."""
    wf = load_workflow(CHAIN)
    api = shrink(ui_to_api(wf, info))
    entry, rec = run_ok(comfy_server, api, workflow=wf)
    return {"workflow": wf, "api": api, "entry": entry, "events": rec}


def test_nodes_are_listed_with_tooltips(info) -> None:
    ours = {k: v for k, v in info.items() if k.startswith("SeqLoRA")}
    assert set(ours) >= {
        TRAIN,
        "SeqLoRAMultiConceptLoader",
        "SeqLoRALoadBank",
        "SeqLoRASaveBank",
        "SeqLoRAExportLoRA",
        "SeqLoRAInterferenceReport",
        "SeqLoRAImageFolder",
    }
    for name, spec in ours.items():
        assert spec["category"] == "SeqLoRA"
        for section in ("required", "optional"):
            for inp, entry in (spec["input"].get(section) or {}).items():
                assert entry[1].get("tooltip"), f"{name}.{inp} has no tooltip"


@pytest.mark.parametrize("path", [CHAIN, REGIONS, ADD], ids=lambda p: p.stem)
def test_workflows_validate_against_object_info(comfy_server, info, path) -> None:
    (comfy_server.models / "seqlora" / BANK).touch(exist_ok=True)  # the combo lists files that exist
    live = comfy_server.object_info()
    wf = load_workflow(path)
    assert validate_ui_workflow(wf, live) == []
    api = ui_to_api(wf, live)
    assert api, "empty prompt"
    templates = comfy_server.get("/workflow_templates")
    listed = next(v for k, v in templates.items() if "seqlora" in k.lower())
    assert path.stem in listed


def test_chain_trains_three_concepts_and_previews_each(comfy_server, chain_run) -> None:
    api, entry, rec = chain_run["api"], chain_run["entry"], chain_run["events"]
    trains = ids_of(api, TRAIN)
    assert len(trains) == 3
    previews = ids_of(api, "PreviewImage")
    assert len(previews) == 3 and all(entry["outputs"][p]["images"] for p in previews)
    losses = rec.of("seqlora.loss")
    for t in trains:
        steps = [d["step"] for d in losses if d["node"] == t]
        assert steps and max(steps) == TRAIN_STEPS, f"train node {t}: loss events {steps}"
        assert any(d.get("node") == t for d in rec.of("progress"))
    bank = comfy_server.models / "seqlora" / BANK
    assert bank.is_file() and bank.stat().st_size > 0
    report = ids_of(api, "SeqLoRAInterferenceReport")[0]
    assert entry["outputs"][report]["images"], "the report shows its heatmap in the node"
    info = comfy_server.get(f"/seqlora/bank_info?file={BANK}")
    assert [c["name"] for c in info["concepts"]] == ["dog", "cat", "hat"]
    assert info["concepts"][0]["triggers"] == ["sks dog"]


def test_requeue_after_editing_one_concept_retrains_only_it_and_later(comfy_server, chain_run) -> None:
    api = json.loads(json.dumps(chain_run["api"]))
    trains = ids_of(api, TRAIN)
    api[trains[1]]["inputs"]["steps"] = TRAIN_STEPS + 1
    entry, rec = run_ok(comfy_server, api)
    executed = {d["node"] for d in rec.of("executing") if d.get("node")}
    cached = {n for d in rec.of("execution_cached") for n in d.get("nodes", [])}
    assert trains[0] in cached and trains[0] not in executed
    assert trains[1] in executed and trains[2] in executed


def test_compose_regions_workflow(comfy_server, chain_run, info) -> None:
    wf = load_workflow(REGIONS)
    api = shrink(ui_to_api(wf, info))
    entry, _ = run_ok(comfy_server, api, workflow=wf)
    save = ids_of(api, "SaveImage")[0]
    img = entry["outputs"][save]["images"][0]
    assert (comfy_server.output_dir / img.get("subfolder", "") / img["filename"]).is_file()
    loader = ids_of(api, "SeqLoRAMultiConceptLoader")[0]
    names = [c["name"] for c in entry["outputs"][loader]["seqlora_concepts"]]
    assert names[:2] == ["dog", "cat"]


def test_add_concept_to_existing_bank(comfy_server, chain_run, info) -> None:
    bank = comfy_server.models / "seqlora" / BANK
    before = sha(bank)
    wf = load_workflow(ADD)
    api = shrink(ui_to_api(wf, info))
    run_ok(comfy_server, api, workflow=wf)
    names = [c["name"] for c in comfy_server.get(f"/seqlora/bank_info?file={BANK}")["concepts"]]
    assert names[-1] == "toy" and "dog" in names
    baks = list(bank.parent.glob(bank.name + ".bak*"))  # .bak, .bak2, ...: no backup is overwritten
    newest = max(baks, key=lambda p: int(p.name.rsplit(".bak", 1)[1] or 1))
    assert sha(newest) == before, "the previous bank is kept"
    assert (comfy_server.models / "loras" / "toy.safetensors").is_file()
    # queue again: the bank now holds 'toy'; the node recognises it and trains nothing
    entry, rec = run_ok(comfy_server, api)
    assert not [d for d in rec.of("seqlora.loss")], "re-running an identical add must not retrain"
    names2 = [c["name"] for c in comfy_server.get(f"/seqlora/bank_info?file={BANK}")["concepts"]]
    assert names2 == names
