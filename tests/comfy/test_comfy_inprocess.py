"""In-process against a real ComfyUI: the pack registers its nodes from the schema, and the three ways to
apply concepts agree: our loader merged, our loader bypass, and the exported kohya files loaded with
ComfyUI's stock LoraLoader."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from comfy_harness import make_images

pytestmark = pytest.mark.slow
TRAIN = "SeqLoRATrainConcept"
LOADER = "SeqLoRAMultiConceptLoader"


def test_pack_registers_nodes_from_the_schema(pack) -> None:
    schema = pack.nodes.schema
    mappings = pack.NODE_CLASS_MAPPINGS
    assert set(mappings) == set(schema.BY_ID)
    for node_id, cls in mappings.items():
        spec = schema.BY_ID[node_id]
        types = cls.INPUT_TYPES()
        assert list(types["required"]) == [i.name for i in spec.inputs if not i.optional]
        assert cls.CATEGORY == "SeqLoRA"
        assert tuple(o.type for o in spec.outputs) == cls.RETURN_TYPES
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id] == spec.display_name
        assert hasattr(cls, cls.FUNCTION)


def test_image_folder_captions_drop_the_byte_order_mark(pack, comfy_models: Path) -> None:
    """Captions saved as 'UTF-8 with BOM' or 'Unicode' (UTF-16) come out as their text: the node used to
    read them on its own as UTF-8 and train on '\ufeff...'."""
    folder = make_images(comfy_models / "input" / "seqlora" / "bom", 2, size=64, seed=3)
    (folder / "img_00.txt").write_bytes("\ufeffzq bom, first".encode())
    (folder / "img_01.txt").write_bytes("\ufeffzq bom, second".encode("utf-16-le"))
    with torch.inference_mode():
        _, captions, count = pack.NODE_CLASS_MAPPINGS["SeqLoRAImageFolder"]().run("seqlora/bom", 64)["result"]
    assert count == 2 and captions.split("\n") == ["zq bom, first", "zq bom, second"]


@pytest.fixture(scope="module")
def trained(pack, tiny_loaded, comfy_models: Path):
    """Two concepts trained through the Train node (a few steps, 64 px), as ComfyUI would run them."""
    model, clip, vae = tiny_loaded
    nodes = pack.NODE_CLASS_MAPPINGS
    bank = None
    out_model = model
    for i, (name, colour) in enumerate((("red_ball", (220, 20, 20)), ("blue_box", (20, 20, 220)))):
        make_images(comfy_models / "input" / "seqlora" / name, 2, size=64, seed=20 + i, color=colour)
        with torch.inference_mode():
            images, captions, _ = nodes["SeqLoRAImageFolder"]().run(f"seqlora/{name}", 64)["result"]
            bank, out_model, loss = nodes[TRAIN]().run(
                out_model,
                clip,
                vae,
                images,
                name,
                f"zq {name}",
                "seqlora",
                4,
                2,
                1e-2,
                0.05,
                "attn",
                i,
                1,
                "a photo of {trigger}",
                bank,
                captions,
                unique_id=str(10 + i),
            )["result"]
        assert len(loss["loss"]) == 2
    return bank


def _predict(patcher, seed: int = 0) -> torch.Tensor:
    import comfy.model_management as mm

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    sigma = torch.tensor([2.0])
    with torch.inference_mode():
        mm.load_models_gpu([patcher], force_full_load=True)
        return patcher.model.apply_model(x, sigma, c_crossattn=ctx).float().clone()


def test_merged_bypass_and_stock_lora_loader_agree(pack, trained, tiny_loaded) -> None:
    import nodes as comfy_nodes

    model, clip, _ = tiny_loaded
    ours = pack.NODE_CLASS_MAPPINGS
    selection = "red_ball:0.8, blue_box:1.3"
    base = _predict(model)
    merged = _predict(ours[LOADER]().run(model, "(linked bank)", selection, "merged", trained)["result"][0])
    bypass = _predict(ours[LOADER]().run(model, "(linked bank)", selection, "bypass", trained)["result"][0])

    for name in ("red_ball", "blue_box"):
        ours["SeqLoRAExportLoRA"]().run(trained, name, f"exp_{name}", "fp32", True)
    stock = model
    for name, s in (("red_ball", 0.8), ("blue_box", 1.3)):
        stock, _ = comfy_nodes.LoraLoader().load_lora(stock, clip, f"exp_{name}.safetensors", s, 0.0)
    assert len(stock.patches) == len(trained.layers), "every exported key maps onto the model"
    stock_out = _predict(stock)

    effect = (merged - base).abs().max().item()
    scale = base.abs().max().item()
    assert effect > 1e-4 * scale, "the concepts change the output (otherwise the comparison is empty)"
    assert (stock_out - merged).abs().max().item() <= 1e-5 * scale + 1e-6, "stock LoraLoader == our merged"
    assert (bypass - merged).abs().max().item() <= 1e-3 * max(effect, 1e-6) + 1e-5 * scale, "bypass == merged"
    assert torch.equal(_predict(model), base), "the original model is untouched afterwards"


def test_disabled_concepts_and_zero_strength_are_off(pack, trained, tiny_loaded) -> None:
    model = tiny_loaded[0]
    loader = pack.NODE_CLASS_MAPPINGS[LOADER]()
    only_red = _predict(loader.run(model, "(linked bank)", "red_ball:1", "merged", trained)["result"][0])
    toggled = _predict(loader.run(model, "(linked bank)", "red_ball:1, !blue_box:1", "merged", trained)["result"][0])
    zero = _predict(loader.run(model, "(linked bank)", "red_ball:1, blue_box:0", "bypass", trained)["result"][0])
    assert torch.allclose(only_red, toggled) and torch.allclose(only_red, zero, atol=1e-4)
    with pytest.raises(ValueError, match="not in the bank"):
        loader.run(model, "(linked bank)", "green_cone:1", "merged", trained)


def test_train_output_model_is_the_loader_with_every_concept(pack, trained, tiny_loaded) -> None:
    model = tiny_loaded[0]
    loader = pack.NODE_CLASS_MAPPINGS[LOADER]()
    via_loader = _predict(loader.run(model, "(linked bank)", "", "merged", trained)["result"][0])
    # the loader ignores SeqLoRA patches already on its input model: no concept is applied twice
    twice = loader.run(model, "(linked bank)", "", "merged", trained)["result"][0]
    again = _predict(loader.run(twice, "(linked bank)", "", "merged", trained)["result"][0])
    assert torch.allclose(via_loader, again)


def _train(pack, tiny_loaded, images, captions, name: str, steps: int):
    model, clip, vae = tiny_loaded
    with torch.inference_mode():
        return pack.NODE_CLASS_MAPPINGS[TRAIN]().run(
            model,
            clip,
            vae,
            images,
            name,
            "zq thing",
            "seqlora",
            4,
            steps,
            1e-2,
            0.05,
            "attn",
            7,
            1,
            "a photo of {trigger}",
            None,
            captions,
            unique_id="99",
        )["result"]


def test_training_is_deterministic_and_an_interrupted_run_resumes_to_the_same_result(
    pack, tiny_loaded, comfy_models: Path
) -> None:
    import comfy.model_management as mm
    import comfy.utils

    make_images(comfy_models / "input" / "seqlora" / "det", 2, size=64, seed=40, color=(90, 200, 90))
    with torch.inference_mode():
        images, captions, _ = pack.NODE_CLASS_MAPPINGS["SeqLoRAImageFolder"]().run("seqlora/det", 64)["result"]
    autosave = comfy_models / "seqlora" / ".autosave"
    STEPS = 8  # noqa: N806

    def factors(bank):
        c = bank.concepts[-1]
        return torch.cat([torch.cat([c.layers[s.name].A.flatten(), c.layers[s.name].B.flatten()]) for s in bank.layers])

    straight = factors(_train(pack, tiny_loaded, images, captions, "det", STEPS)[0])
    for p in autosave.glob("det-*.bank"):
        p.unlink()
    again = factors(_train(pack, tiny_loaded, images, captions, "det", STEPS)[0])
    assert torch.equal(straight, again), "same inputs, same concept"
    for p in autosave.glob("det-*.bank"):
        p.unlink()

    def interrupt_at_3(value, total, preview, node_id=None):
        if value == 3 and node_id == "99":  # a training step (the base model's prior has its own bar)
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(interrupt_at_3)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(pack, tiny_loaded, images, captions, "det", STEPS)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert list(autosave.glob("det-*.checkpoint")), "the interrupted run left a checkpoint"
    bank, _, loss = _train(pack, tiny_loaded, images, captions, "det", STEPS)
    assert len(loss["loss"]) == STEPS
    assert torch.allclose(factors(bank), straight, atol=1e-6), "resumed == uninterrupted"
    assert not list(autosave.glob("det-*.checkpoint"))


def test_events_outside_a_server_look_the_server_up_once(pack, monkeypatch) -> None:
    """Where ComfyUI's ``server`` does not import (scripts, this process), training events do not retry
    the import each time: a failed import is not cached by Python and cost milliseconds per event."""
    training = pack.nodes.training
    attempts = []

    class FailingServer:  # a finder for "server" that always fails, counting the attempts
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "server":
                attempts.append(name)
                raise ImportError("no server here")
            return None

    monkeypatch.delitem(sys.modules, "server", raising=False)
    monkeypatch.setattr(sys, "meta_path", [FailingServer, *sys.meta_path])
    training._prompt_server_class.cache_clear()
    try:
        for step in range(5):
            training.send_event(training.LOSS_EVENT, {"node": "x", "step": step})
        assert training.server() is None
        assert attempts == ["server"]
    finally:
        training._prompt_server_class.cache_clear()
