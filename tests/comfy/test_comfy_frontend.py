"""The frontend extension inside ComfyUI's real web app, driven by headless Chromium (skipped without one).

Checks what only the real frontend can: the extension registers once, the extra widgets it adds are
not serialised (so positional ``widgets_values`` stay valid), the loss event reaches the chart, the
loader lists a bank's concepts from /seqlora/bank_info and its checkboxes rewrite the ``concepts``
text, and nothing in the page throws. A screenshot is left in the test's temp folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from comfy_harness import chromium, comfy_page

pytestmark = [pytest.mark.slow, pytest.mark.skipif(chromium() is None, reason="no headless Chromium installed")]


@pytest.fixture(scope="module")
def page(comfy_server, tmp_path_factory):
    from seqlora_core.method.bank import Concept, ConceptBank, ConceptLayer
    from seqlora_core.method.targets import LayerSpec

    layer = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"

    def factors() -> ConceptLayer:
        return ConceptLayer(torch.linalg.qr(torch.randn(320, 4))[0].T.contiguous(), torch.zeros(320, 4))

    concepts = [Concept(n, [t], 4, "seqlora", {layer: factors()}) for n, t in (("dog", "sks dog"), ("cat", "pqz cat"))]
    ConceptBank([LayerSpec(layer, "linear", 320, 320)], "ldm", "SD15", {}, concepts).save(
        comfy_server.models / "seqlora" / "ui_bank.safetensors"
    )

    profile = tmp_path_factory.mktemp("chromium")
    with comfy_page(comfy_server, profile) as cdp:
        yield cdp, profile


def test_extension_registers_once(page) -> None:
    cdp, _ = page
    names = cdp.js("(window.app.extensions || []).map(e => e.name)")
    assert names.count("SeqLoRA.UI") == 1, names
    files = cdp.js("fetch('/extensions').then(r => r.json())")
    assert any(f.endswith("/seqlora.js") for f in files), files


def test_train_node_chart_is_not_serialised_and_takes_loss_events(page) -> None:
    cdp, _ = page
    out = cdp.js("""(() => {
        const n = LiteGraph.createNode('SeqLoRATrainConcept'); n.pos = [40, 40]; app.graph.add(n);
        const api = window.comfyAPI?.api?.api;
        for (const [s, l] of [[1, 1.0], [2, 0.8], [3, 0.7]])
            api.dispatchCustomEvent('seqlora.loss', {node: String(n.id), step: s, total: 3, loss: l});
        app.graph.setDirtyCanvas(true, true);
        return {widgets: n.widgets.map(w => w.name), values: n.serialize().widgets_values,
                points: n.__seqloraLoss?.points?.length ?? 0, status: n.__seqloraLoss?.status};
    })()""")
    assert "seqlora_loss_chart" in out["widgets"]
    assert len(out["values"]) == 12, out["values"]
    assert out["points"] == 3 and out["status"].startswith("step 3/3")


def test_loader_lists_concepts_and_edits_the_text(page) -> None:
    cdp, profile = page
    cdp.js("""(() => {
        const n = LiteGraph.createNode('SeqLoRAMultiConceptLoader'); n.pos = [520, 40]; app.graph.add(n);
        window.__seqloraTestLoader = n;
        const w = n.widgets.find(w => w.name === 'bank_file');
        w.value = 'ui_bank.safetensors'; w.callback?.(w.value);
        return true;
    })()""")
    cdp.wait_js("(window.__seqloraTestLoader.__seqloraBank || []).length === 2", timeout=30)
    out = cdp.js("""(() => {
        const n = window.__seqloraTestLoader;
        const rows = n.__seqloraListEl.querySelectorAll('.seqlora-row');
        const boxes = n.__seqloraListEl.querySelectorAll('input[type=checkbox]');
        boxes[1].click();
        return {rows: rows.length, text: rows[0].textContent,
                concepts: n.widgets.find(w => w.name === 'concepts').value,
                values: n.serialize().widgets_values};
    })()""")
    assert out["rows"] == 2 and "sks dog" in out["text"]
    assert out["concepts"] == "dog:1, !cat:1"
    assert out["values"] == ["ui_bank.safetensors", "dog:1, !cat:1", "merged"]
    time.sleep(0.5)
    cdp.js("app.graph.setDirtyCanvas(true, true); true")
    time.sleep(0.5)
    (profile / "seqlora_nodes.png").write_bytes(cdp.screenshot())
    assert not [p for p in cdp.problems() if "seqlora" in p.lower()], cdp.problems()


def test_no_page_errors(page) -> None:
    cdp, _ = page
    time.sleep(1)
    cdp.js("1")
    assert not [p for p in cdp.problems() if "seqlora" in p.lower()], cdp.problems()
    assert Path(page[1] / "seqlora_nodes.png").is_file()


@pytest.mark.parametrize(
    "name", ["seqlora_train_three_concepts", "seqlora_compose_regions", "seqlora_add_concept_to_bank"]
)
def test_workflow_loads_in_the_editor_and_exports_what_the_converter_makes(page, comfy_server, name) -> None:
    from comfy_harness import REPO_ROOT, SD15_CHECKPOINT, load_workflow, ui_to_api

    cdp, _ = page
    (comfy_server.models / "checkpoints" / SD15_CHECKPOINT).touch(exist_ok=True)
    (comfy_server.models / "seqlora" / "my_concepts.safetensors").touch(exist_ok=True)
    wf = load_workflow(REPO_ROOT / "workflows" / f"{name}.json")
    exported = cdp.js(f"""(async () => {{
        await app.loadGraphData({json.dumps(wf)});
        const p = await app.graphToPrompt();
        return p.output;
    }})()""")
    ours = ui_to_api(wf, comfy_server.object_info())
    strip = lambda api: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}  # noqa: E731
    assert strip(exported) == strip(ours)
    assert not [p for p in cdp.problems() if "seqlora" in p.lower()], cdp.problems()


def test_executed_messages_fill_the_linked_list_and_the_text(page) -> None:
    cdp, _ = page
    out = cdp.js("""(() => {
        const loader = LiteGraph.createNode('SeqLoRAMultiConceptLoader'); app.graph.add(loader);
        loader.onExecuted({seqlora_concepts: [{name: 'a', triggers: ['ta']}, {name: 'b', triggers: []}]});
        const rep = LiteGraph.createNode('SeqLoRAInterferenceReport'); app.graph.add(rep);
        rep.onExecuted({text: ['2 concepts; mean relative interference 0.01'], images: []});
        return {rows: loader.__seqloraListEl.querySelectorAll('.seqlora-row').length,
                text: rep.__seqloraTextEl?.value, values: rep.serialize().widgets_values};
    })()""")
    assert out["rows"] == 2
    assert out["text"].startswith("2 concepts")
    assert out["values"] == [0.05]


@pytest.mark.parametrize(
    "name", ["seqlora_train_three_concepts", "seqlora_compose_regions", "seqlora_add_concept_to_bank"]
)
def test_workflow_layout_shows_every_node_and_chart_whole(page, comfy_server, name) -> None:
    """In the real editor no node overlaps another (a Train node's loss chart is drawn at its bottom, so an
    overlap hides it) and every node is as large as its widgets and chart need."""
    from comfy_harness import REPO_ROOT, load_workflow, node_boxes, overlaps

    cdp, _ = page
    workflow = load_workflow(REPO_ROOT / "workflows" / f"{name}.json")
    boxes = node_boxes(cdp, workflow)
    assert overlaps(boxes) == []
    short = [b for b in boxes if b["need_w"] > b["w"] + 1 or b["need_h"] > b["body_h"] + 1]
    assert short == [], short
    trains = [b for b in boxes if b["type"] == "SeqLoRATrainConcept"]
    assert len(trains) == sum(n["type"] == "SeqLoRATrainConcept" for n in workflow["nodes"]), "each one measured"
    assert all(b["need_h"] >= 130 for b in trains), "the chart is part of the Train node's size"


def test_every_template_has_a_thumbnail_the_browser_can_show(page, comfy_server) -> None:
    cdp, _ = page
    names = sorted(set(comfy_server.get("/workflow_templates")["seqlora"]))
    assert names == ["seqlora_add_concept_to_bank", "seqlora_compose_regions", "seqlora_train_three_concepts"]
    sizes = cdp.js(f"""(async () => {{
        const out = [];
        for (const n of {json.dumps(names)}) {{
            const img = new Image(); img.src = `/api/workflow_templates/seqlora/${{n}}.jpg`;
            await img.decode(); out.push([img.naturalWidth, img.naturalHeight]);
        }}
        return out;
    }})()""")
    assert all(w >= 320 and h >= 160 for w, h in sizes), sizes


def test_status_notices_show_on_the_train_node(page) -> None:
    cdp, _ = page
    out = cdp.js("""(() => {
        const n = LiteGraph.createNode('SeqLoRATrainConcept'); app.graph.add(n);
        const api = window.comfyAPI?.api?.api;
        const ev = {node: String(n.id), text: 'measuring the base model', kind: 'phase'};
        api.dispatchCustomEvent('seqlora.status', ev);
        const phase = n.__seqloraLoss.note;
        api.dispatchCustomEvent('seqlora.loss', {node: String(n.id), step: 1, total: 2, loss: 1.0});
        const cleared = n.__seqloraLoss.note;
        n.onExecuted({text: ['dog: the inputs or settings changed ...; training restarts from step 1']});
        return {phase, cleared, notice: n.__seqloraLoss.note};
    })()""")
    assert out["phase"] == "measuring the base model" and out["cleared"] == ""
    assert "restarts from step 1" in out["notice"]
