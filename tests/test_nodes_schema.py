"""The ComfyUI node definitions, checked without ComfyUI.

The node classes import ComfyUI at module level, so outside ComfyUI the pack exports empty mappings;
the nodes' inputs, tooltips, ranges and outputs live in plain Python (nodes/schema.py), from which the
classes build INPUT_TYPES. This test loads the repository the way ComfyUI loads a custom-node pack
and checks those descriptions and the example workflows' widget values against them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = "seqlora_pack_schema_test"


@pytest.fixture(scope="module")
def pack():
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def schema(pack):
    return pack.nodes.schema


def test_pack_imports_outside_comfyui(pack) -> None:
    if "comfy.model_management" in sys.modules:
        pytest.skip("ComfyUI is loaded in this process; tests/comfy checks the registered pack there")
    assert pack.NODE_CLASS_MAPPINGS == {} and pack.NODE_DISPLAY_NAME_MAPPINGS == {}
    web = (ROOT / pack.WEB_DIRECTORY).resolve()
    assert (web / "seqlora.js").is_file()


def test_every_node_is_described(schema) -> None:
    ids = [n.node_id for n in schema.NODES]
    assert len(ids) == len(set(ids))
    assert set(ids) == {
        "SeqLoRATrainConcept",
        "SeqLoRAImageFolder",
        "SeqLoRAMultiConceptLoader",
        "SeqLoRALoadBank",
        "SeqLoRASaveBank",
        "SeqLoRAExportLoRA",
        "SeqLoRAInterferenceReport",
        "SeqLoRARemoveConcept",
    }
    for node in schema.NODES:
        assert node.node_id.startswith("SeqLoRA") and node.display_name.startswith("SeqLoRA ")
        assert node.description.strip()
        assert node.outputs, node.node_id
        for out in node.outputs:
            assert out.tooltip.strip() and out.name and out.type
        names = [i.name for i in node.inputs]
        assert len(names) == len(set(names)), node.node_id


def test_every_input_has_a_tooltip_and_a_sane_default(schema) -> None:
    for node in schema.NODES:
        for inp in node.inputs:
            where = f"{node.node_id}.{inp.name}"
            assert inp.tooltip.strip() and len(inp.tooltip) >= 15, where
            if inp.type in ("INT", "FLOAT"):
                assert inp.default is not None and inp.min is not None and inp.max is not None, where
                assert inp.min <= inp.default <= inp.max, where
            if inp.type == "INT":
                assert all(isinstance(v, int) for v in (inp.default, inp.min, inp.max)), where
            if inp.type == "COMBO" and isinstance(inp.choices, tuple):
                assert inp.default in inp.choices, where
            if inp.type == "STRING":
                assert isinstance(inp.default, str) or inp.force_input, where


def test_input_types_are_valid_v1(schema) -> None:
    files = ["a.safetensors", "b.safetensors"]
    for node in schema.NODES:
        it = schema.input_types(node, lambda key: [schema.LINKED_BANK, *files] if key == "bank_files" else files)
        assert set(it) <= {"required", "optional", "hidden"}
        for section in ("required", "optional"):
            for name, entry in it.get(section, {}).items():
                typ, opts = entry
                assert opts["tooltip"], name
                if isinstance(typ, list):
                    assert typ, f"{node.node_id}.{name}: empty combo"
                    if "default" in opts:
                        assert opts["default"] in typ, f"{node.node_id}.{name}"
    train = schema.input_types(schema.TRAIN)
    assert "seqlora" in train["required"]["method"][0] and "attn" in train["required"]["target_preset"][0]
    assert train["required"]["rank"][1]["min"] == 1 and train["required"]["rank"][1]["max"] == 128
    assert train["optional"]["bank"][0] == schema.BANK
    assert train["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert [o.type for o in schema.TRAIN.outputs] == [schema.BANK, "MODEL", "LOSS_MAP"]


def _workflows():
    return sorted((ROOT / "workflows").glob("*.json"))


def test_example_workflows_are_a_copy_of_workflows(tmp_path: Path) -> None:
    """ComfyUI's template browser reads example_workflows/; workflows/ is the source. Run
    `python tools/sync_example_workflows.py` after editing a workflow."""
    spec = importlib.util.spec_from_file_location("_sync_workflows", ROOT / "tools" / "sync_example_workflows.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.differences() == [], "run: python tools/sync_example_workflows.py"
    # the tool itself: a stale copy is brought back in line
    src, copy = tmp_path / "src", tmp_path / "copy"
    src.mkdir()
    copy.mkdir()
    (src / "a.json").write_text("{}")
    (copy / "a.json").write_text('{"old": 1}')
    (copy / "gone.json").write_text("{}")
    assert len(tool.differences(src, copy)) == 2
    tool.sync(src, copy)
    assert tool.differences(src, copy) == [] and sorted(p.name for p in copy.iterdir()) == ["a.json"]


def test_there_are_three_example_workflows() -> None:
    names = {p.stem for p in _workflows()}
    assert {"seqlora_train_three_concepts", "seqlora_compose_regions", "seqlora_add_concept_to_bank"} <= names


@pytest.mark.parametrize("path", _workflows(), ids=lambda p: p.stem)
def test_workflow_widgets_match_the_schema(schema, path: Path) -> None:
    wf = json.loads(path.read_text())
    assert {"nodes", "links", "version", "last_node_id", "last_link_id"} <= set(wf)
    nodes = {n["id"]: n for n in wf["nodes"]}
    ours = [n for n in wf["nodes"] if n["type"] in schema.BY_ID]
    assert ours
    for node in ours:
        spec = schema.BY_ID[node["type"]]
        values = node["widgets_values"]
        assert len(values) == spec.widget_count(), f"{path.name} node {node['id']}"
        pos = 0
        for inp in spec.widgets():
            v = values[pos]
            pos += inp.widget_count()
            where = f"{path.name} node {node['id']} {inp.name}={v!r}"
            if inp.type in ("INT", "FLOAT"):
                assert inp.min <= v <= inp.max, where
            elif inp.type == "COMBO" and isinstance(inp.choices, tuple):
                assert v in inp.choices, where
            elif inp.type == "STRING":
                assert isinstance(v, str), where
        for sock in node.get("inputs", []):
            inp = spec.input(sock["name"])
            assert sock["type"] == inp.type, f"{path.name} node {node['id']} input {sock['name']}"
    for link in wf["links"]:
        _, src, slot, dst, _, typ = link
        if nodes[src]["type"] in schema.BY_ID:
            assert schema.BY_ID[nodes[src]["type"]].outputs[slot].type == typ, f"{path.name} link {link[0]}"
    assert "v1-5-pruned-emaonly.safetensors" in json.dumps(wf)
