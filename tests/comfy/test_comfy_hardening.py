"""Inside a real ComfyUI: the Image Folder node reads only inside input/seqlora (and the folders
extra_model_paths names), links included, with a bounded change check; Save Bank never replaces a file
unasked and keeps backups; Export LoRA refuses existing files and banks, and distinct concept names never
share a file; Remove Concept drops one concept; the bank_info route validates its input and shows no
absolute path."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from comfy_harness import make_images

REPO = Path(__file__).resolve().parents[2]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bank(concepts: int = 2):
    import sys

    sys.path.insert(0, str(REPO))
    from tests._banks import synthetic_bank

    return synthetic_bank(concepts)


@pytest.fixture()
def folder_node(pack):
    return pack.NODE_CLASS_MAPPINGS["SeqLoRAImageFolder"]


@pytest.fixture()
def images_root(comfy_models: Path) -> Path:
    root = comfy_models / "input" / "seqlora"
    make_images(root / "safe", 2, size=64, seed=5, caption="zq safe")
    return root


# ----------------------------------------------------------------------------------------------- Image Folder


def test_folders_inside_input_seqlora_are_read(folder_node, images_root) -> None:
    with torch.inference_mode():
        images, captions, count = folder_node().run("seqlora/safe", 64)["result"]
        same, _, _ = folder_node().run(str(images_root / "safe"), 64)["result"]
    assert count == 2 and captions.split("\n") == ["zq safe", "zq safe"] and torch.equal(images, same)


@pytest.mark.parametrize(
    "text",
    ["/etc", "/", "..", "../..", "seqlora/../..", "seqlora/../../..", "~", "~/", "seqlora", "plain"],
)
def test_folders_outside_input_seqlora_are_refused(folder_node, images_root, comfy_models, text) -> None:
    (comfy_models / "input" / "plain").mkdir(exist_ok=True)
    make_images(comfy_models / "input" / "plain", 1, size=64)
    with pytest.raises(ValueError, match="folder: ") as err:
        folder_node().run(text, 64)
    assert str(comfy_models) not in str(err.value), "no absolute path in the message"
    assert folder_node.IS_CHANGED(text, 64) == "missing", "the change check does not look outside either"


def test_links_that_leave_the_folder_are_not_followed(folder_node, images_root, tmp_path) -> None:
    secret = tmp_path / "secret"
    make_images(secret, 1, size=64, seed=9)
    (secret / "notes.txt").write_text("the secret text")
    (images_root / "linked_dir").symlink_to(secret, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the folders images are read from"):
        folder_node().run("seqlora/linked_dir", 64)
    mixed = images_root / "mixed"
    make_images(mixed, 1, size=64, seed=6)
    (mixed / "stolen.png").symlink_to(secret / "img_00.png")
    (mixed / "img_00.txt").symlink_to(secret / "notes.txt")
    (mixed / "1_more").symlink_to(secret, target_is_directory=True)
    with torch.inference_mode():
        out = folder_node().run("seqlora/mixed", 64)
    _, captions, count = out["result"]
    assert count == 1 and "secret" not in captions
    assert out["ui"]["text"] == [
        "1 image; skipped 1 file: stolen.png: a link that leads outside the folder (not read)"
    ], "the node names what it left out and why"


def test_extra_model_paths_can_add_image_folders(folder_node, images_root, tmp_path) -> None:
    import folder_paths

    extra = tmp_path / "photos"
    make_images(extra / "cat", 2, size=64, seed=8)
    key = "seqlora_images"
    assert key not in folder_paths.folder_names_and_paths
    folder_paths.add_model_folder_path(key, str(extra))
    try:
        with torch.inference_mode():
            assert folder_node().run(str(extra / "cat"), 64)["result"][2] == 2
        with pytest.raises(ValueError, match="outside"):
            folder_node().run(str(tmp_path), 64)
    finally:
        del folder_paths.folder_names_and_paths[key]


def test_the_change_check_sees_what_the_node_reads_and_no_more(folder_node, images_root, monkeypatch) -> None:
    folder = images_root / "watch"
    make_images(folder, 2, size=64, seed=3)
    deep = folder / "unrelated" / "deeper"
    deep.mkdir(parents=True)
    (deep / "big.bin").write_bytes(b"x" * 100)
    first = folder_node.IS_CHANGED("seqlora/watch", 64)
    assert folder_node.IS_CHANGED("seqlora/watch", 64) == first
    (deep / "big.bin").write_bytes(b"y" * 200)  # not read by the node: no re-run
    assert folder_node.IS_CHANGED("seqlora/watch", 64) == first
    (folder / "img_00.txt").write_text("a new caption")
    second = folder_node.IS_CHANGED("seqlora/watch", 64)
    assert second != first
    assert folder_node.IS_CHANGED("seqlora/watch", 128) != second
    import seqlora_core.data.dataset as dataset_module

    for module in {dataset_module, _pack_module("seqlora_core.data.dataset")}:
        monkeypatch.setattr(module, "MAX_ENTRIES", 3)
    assert folder_node.IS_CHANGED("seqlora/watch", 64) == "missing"
    with pytest.raises(ValueError, match="more than 3 entries"):
        folder_node().run("seqlora/watch", 64)


def _pack_module(name: str):
    import sys

    return sys.modules[f"seqlora_pack.{name}"]


# ----------------------------------------------------------------------------------------------- Save Bank


def test_save_bank_never_replaces_a_file_unasked(pack, comfy_models) -> None:
    node = pack.NODE_CLASS_MAPPINGS["SeqLoRASaveBank"]
    assert node.INPUT_TYPES()["required"]["overwrite"][1]["default"] is False
    folder = comfy_models / "seqlora"
    bank = _bank()
    first = Path(node().run(bank, "kept", False)["result"][0])
    original = _sha(first)
    second = Path(node().run(bank.without("c0"), "kept", False)["result"][0])
    third = Path(node().run(bank.without("c1"), "kept.safetensors", False)["result"][0])
    names = (first.name, second.name, third.name)
    assert names == ("kept.safetensors", "kept_00001.safetensors", "kept_00002.safetensors")
    assert _sha(first) == original
    out = node().run(bank.without("c0"), "kept", True)
    assert "kept as kept.safetensors.bak" in out["ui"]["text"][0]
    assert _sha(folder / "kept.safetensors.bak") == original
    node().run(bank, "kept", True)
    assert (folder / "kept.safetensors.bak2").is_file() and _sha(folder / "kept.safetensors.bak") == original


@pytest.mark.parametrize(
    "name,message",
    [("../evil", "names a folder or a path"), ("..", "names a folder"), ("x" * 200, "at most 120"), ("", "empty")],
)
def test_save_bank_names_are_checked(pack, comfy_models, name, message) -> None:
    before = sorted(p.name for p in (comfy_models / "seqlora").iterdir())
    with pytest.raises(ValueError, match=message):
        pack.NODE_CLASS_MAPPINGS["SeqLoRASaveBank"]().run(_bank(), name, True)
    assert sorted(p.name for p in (comfy_models / "seqlora").iterdir()) == before
    assert not (comfy_models / "evil.safetensors").exists()


def test_save_bank_waits_for_no_one_and_names_the_writer(pack, comfy_models) -> None:
    from seqlora_core.files import FileBusyError, FileLock

    busy = pytest.raises(OSError, match=r"in use by process \d+ .*training 'dog'")
    with FileLock(comfy_models / "seqlora" / "busy.safetensors", "training 'dog' (command line)"), busy as err:
        pack.NODE_CLASS_MAPPINGS["SeqLoRASaveBank"]().run(_bank(), "busy", True)
    assert type(err.value).__name__ == FileBusyError.__name__
    assert not (comfy_models / "seqlora" / "busy.safetensors").exists()


# ----------------------------------------------------------------------------------------------- Export LoRA


def test_export_refuses_existing_files_unless_told_and_keeps_a_backup(pack, comfy_models) -> None:
    node = pack.NODE_CLASS_MAPPINGS["SeqLoRAExportLoRA"]
    assert node.INPUT_TYPES()["required"]["overwrite"][1]["default"] is False
    bank = _bank()
    path = Path(node().run(bank, "c0", "exported_c0", "fp32", False)["result"][0])
    original = _sha(path)
    with pytest.raises(FileExistsError, match="filename: exported_c0.safetensors already exists"):
        node().run(bank, "c1", "exported_c0", "fp32", False)
    assert _sha(path) == original
    node().run(bank, "c1", "exported_c0", "fp32", True)
    assert _sha(path.with_name(path.name + ".bak")) == original and _sha(path) != original


def test_export_never_replaces_a_bank(pack, comfy_models) -> None:
    trap = comfy_models / "loras" / "trap.safetensors"
    _bank().save(trap)
    before = _sha(trap)
    with pytest.raises(FileExistsError, match="is a SeqLoRA bank"):
        pack.NODE_CLASS_MAPPINGS["SeqLoRAExportLoRA"]().run(_bank(), "c0", "trap", "fp16", True)
    assert _sha(trap) == before


# names that a plain file-name rule would fold together: a folder separator of either system, its stand-in,
# a case change, the names of the folder itself and its parent
SHARED_STEMS = ("a/b", "a\\b", "a_b", "A_b", "..", ".", "a b")


def test_distinct_concept_names_never_share_a_file(pack, comfy_models) -> None:
    bank = _bank(len(SHARED_STEMS))
    renamed = [dataclasses.replace(c, name=n) for c, n in zip(bank.concepts, SHARED_STEMS, strict=True)]
    bank = dataclasses.replace(bank, concepts=renamed)
    node = pack.NODE_CLASS_MAPPINGS["SeqLoRAExportLoRA"]
    outs = [node().run(bank, name, "", "fp16", False) for name in SHARED_STEMS]
    paths = [Path(out["result"][0]) for out in outs]
    assert len({p.name.lower() for p in paths}) == len(SHARED_STEMS), paths
    assert all(p.parent == comfy_models / "loras" and p.is_file() for p in paths), paths
    assert paths[2].name == "a_b.safetensors", "a safe lower-case name is its own file name"
    for name, out, path in zip(SHARED_STEMS, outs, paths, strict=True):
        assert out["ui"]["text"][0].startswith(f"exported {name!r} to models/loras/{path.name}")
    autosaves = {pack.nodes.autosave.Autosave.of(name, "0" * 20).checkpoint.name.lower() for name in SHARED_STEMS}
    assert len(autosaves) == len(SHARED_STEMS), "nor an autosave"


@pytest.mark.parametrize("name", ["x" * 300, "a:b", "!a"])
def test_concept_names_a_bank_cannot_take_are_a_clear_train_node_error(pack, name) -> None:
    with pytest.raises(ValueError, match="^concept_name: ") as err:
        pack.nodes.train_inputs.check_train_inputs(
            2, name, "zq", "seqlora", 4, 3, 1e-3, 0.05, "attn", 0, 1, "a photo of {trigger}", None, "sd15"
        )
    fix = "300 characters; use at most 100" if len(name) == 300 else "(e.g. 'my_dog')"
    assert fix in str(err.value), err.value


@pytest.mark.parametrize(
    "filename,message",
    [("..", "names a folder"), ("../../escape", "names a folder or a path"), ("x" * 150, "at most 120")],
)
def test_export_file_names_are_checked(pack, comfy_models, filename, message) -> None:
    with pytest.raises(ValueError, match=message) as err:
        pack.NODE_CLASS_MAPPINGS["SeqLoRAExportLoRA"]().run(_bank(), "c0", filename, "fp16", True)
    assert "()" not in str(err.value), "no hint that names a Python function"
    assert not list((comfy_models).glob("escape*"))


# ----------------------------------------------------------------------------------------------- Remove Concept


def test_remove_concept_node(pack) -> None:
    node = pack.NODE_CLASS_MAPPINGS["SeqLoRARemoveConcept"]
    bank = _bank()
    (out,) = node().run(bank, " c0 ")
    assert out.names() == ["c1"] and bank.names() == ["c0", "c1"]
    with pytest.raises(KeyError, match="no concept 'ghost' in the bank; it has: c0, c1"):
        node().run(bank, "ghost")
    with pytest.raises(ValueError, match="concept_name: empty; give one of: c0, c1"):
        node().run(bank, "")


# ----------------------------------------------------------------------------------------------- the route


def _get(pack, query: str) -> tuple[int, dict]:
    from aiohttp.test_utils import make_mocked_request

    routes = _pack_module("nodes.routes")
    request = make_mocked_request("GET", f"/seqlora/bank_info?{query}")
    response = asyncio.run(routes.bank_info(request))
    return response.status, json.loads(response.body)


def test_bank_info_validates_its_input_and_shows_no_absolute_path(pack, comfy_models) -> None:
    import urllib.parse

    folder = comfy_models / "seqlora"
    _bank().save(folder / "good.safetensors")
    status, body = _get(pack, "file=good.safetensors")
    assert status == 200 and [c["name"] for c in body["concepts"]] == ["c0", "c1"]
    outside = comfy_models / "loras" / "outside.safetensors"
    _bank().save(outside)
    for name in ("../loras/outside.safetensors", str(outside), "/etc/passwd", "missing.safetensors", "a\x00b"):
        status, body = _get(pack, "file=" + urllib.parse.quote(name))
        assert status in (400, 404), (name, status)
        assert str(comfy_models) not in json.dumps(body), body
    hostile = json.dumps({"schema_version": 2, "layers": [["x", "linear", 4, 4, [1, 1]]], "concepts": "no"})
    from safetensors.torch import save

    (folder / "hostile.safetensors").write_bytes(
        save({"t": torch.zeros(1)}, metadata={"format": "seqlora-bank", "seqlora": hostile})
    )
    status, body = _get(pack, "file=hostile.safetensors")
    assert status == 422 and "concept list" in body["error"] and str(comfy_models) not in body["error"], body
