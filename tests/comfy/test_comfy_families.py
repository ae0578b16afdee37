"""The Train node on the model families it trains besides SD1.5: SDXL (ADM conditioning: pooled text and
size embeddings, any image size) and SD2 768-v (v-prediction), on tiny checkpoints that ComfyUI itself
detects as SDXL and SD20/V_PREDICTION, in process and through workflows; and the clear message for models
it cannot train (Flux, a video model)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from comfy_harness import (
    SAMPLER_OUTPUT,
    build_tiny_checkpoint,
    cache_dir,
    history_error,
    make_images,
    sampler_graph,
)

pytestmark = pytest.mark.slow
TRAIN = "SeqLoRATrainConcept"
FAMILY_VERSION = 1  # bump when the tiny recipes change
CHECKPOINTS = {"sdxl": "tiny_sdxl.safetensors", "sd2v": "tiny_sd2v.safetensors"}


def _checkpoint(family: str) -> Path:
    return build_tiny_checkpoint(cache_dir() / f"tiny-{family}-v{FAMILY_VERSION}-seed0.safetensors", 0, family)


@pytest.fixture(scope="module")
def family_checkpoints(comfyui) -> dict[str, Path]:
    return {family: _checkpoint(family) for family in CHECKPOINTS}


# In process, the text encoders keep 3 of their layers (the rest of the file is ignored): CLIP-bigG and
# OpenCLIP-H in full take minutes per prompt on a CPU, and these tests check the UNet side. The workflows
# below load the whole checkpoint as ComfyUI's own loader does.
SMALL_TEXT = {f"clip_{x}_model_config": {"num_hidden_layers": 3} for x in ("l", "g", "h")}


def _load(path: Path):
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, te_model_options=SMALL_TEXT
    )
    return out[:3]


# The layers trained here: the 320-wide attention projections of each first transformer block. The full
# "attn" preset adds the cross-attention keys and values, whose inputs are the text features (2048 wide for
# SDXL, 1024 for SD2); the basis initialisation costs O(n^3) in float64 per layer, which is minutes per
# such layer on a shared CPU. A bank that names its layers is how a Train node is told which to train.
LAYERS = (
    "*.transformer_blocks.0.attn1.to_q",
    "*.transformer_blocks.0.attn1.to_out.0",
    "*.transformer_blocks.0.attn2.to_q",
)


def _layer_bank(model, arch: str):
    """An empty bank (no concepts, no prior yet) over `LAYERS` of `model`."""
    from seqlora_core.method.bank import ConceptBank
    from seqlora_core.method.targets import find_targets

    return ConceptBank(find_targets(model.model.diffusion_model, LAYERS), "ldm", arch)


def _train(pack, loaded, images: torch.Tensor, name: str, steps: int = 3, bank=None, **kw) -> dict[str, Any]:
    model, clip, vae = loaded
    with torch.inference_mode():
        return pack.NODE_CLASS_MAPPINGS[TRAIN]().run(
            model,
            clip,
            vae,
            images,
            name,
            f"zq {name}",
            "seqlora",
            4,
            steps,
            1e-3,
            0.05,
            "attn",
            1,
            1,
            "a photo of {trigger}",
            bank,
            None,
            unique_id=f"fam-{name}",
            **kw,
        )


def _images(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, height, width, 3, generator=g)


def _stock_loads_every_key(pack, bank, name: str, loaded, file_name: str) -> dict[str, Any]:
    """Export `name`, load it with the stock LoraLoader: every key maps, and it equals our merged model."""
    import comfy.model_management as mm
    from safetensors import safe_open

    import nodes as comfy_nodes

    model, clip, _ = loaded
    path = Path(pack.NODE_CLASS_MAPPINGS["SeqLoRAExportLoRA"]().run(bank, name, file_name, "fp32", True)["result"][0])
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    stock, _ = comfy_nodes.LoraLoader().load_lora(model, clip, path.name, 1.0, 0.0)
    ours = pack.NODE_CLASS_MAPPINGS["SeqLoRAMultiConceptLoader"]().run(
        model, "(linked bank)", f"{name}:1", "merged", bank
    )
    trained = {s.name for s in bank.layers if float(bank.concept(name).layers[s.name].B.abs().max()) > 0}
    assert len(keys) == 3 * len(trained), "the export holds every layer the concept changed"
    assert {k[len("diffusion_model.") : -len(".weight")] for k in stock.patches} == trained, "and each maps"
    outs = []
    for patcher in (model, stock, ours["result"][0]):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=g)
        ctx = torch.randn(1, 77, _context_dim(model), generator=g)
        extra = {"y": torch.randn(1, model.model.adm_channels, generator=g)} if model.model.adm_channels else {}
        with torch.inference_mode():
            mm.load_models_gpu([patcher], force_full_load=True)
            outs.append(patcher.model.apply_model(x, torch.tensor([2.0]), c_crossattn=ctx, **extra).float().clone())
    base, stock_out, ours_out = outs
    scale = float(base.abs().max())
    assert float((ours_out - base).abs().max()) > 1e-5 * scale, "the concept changes the output"
    assert float((stock_out - ours_out).abs().max()) <= 1e-5 * scale + 1e-6, "stock LoraLoader == our merged"
    return {"keys": keys, "meta": meta}


def _context_dim(model) -> int:
    return int(model.model.model_config.unet_config["context_dim"])


# --------------------------------------------------------------------------- in process


def test_sdxl_trains_with_its_size_conditioning_at_any_image_size(pack, family_checkpoints, comfy_models) -> None:
    """A non-square batch (96 high, 64 wide): the Train node passes SDXL's ADM vector with the images' own
    size, trains, builds the base model's prior, and the export carries SDXL's LDM names (sd-scripts)."""
    from seqlora_core.interop.naming import STRUCTURE_META

    loaded = _load(family_checkpoints["sdxl"])
    model, clip, vae = loaded
    assert type(model.model.model_config).__name__ == "SDXL"
    images = _images(2, 96, 64, seed=3)
    out = _train(pack, loaded, images, "xl_thing", bank=_layer_bank(model, "sdxl"), class_prompt="a photo of a thing")
    bank, _, loss = out["result"]
    assert bank.architecture == "sdxl" and bank.names() == ["xl_thing"]
    assert len(loss["loss"]) == 3 and all(math.isfinite(v) for v in loss["loss"])
    assert bank.prior and set(bank.prior) == {s.name for s in bank.layers}, "concept 0 from the base model"
    assert STRUCTURE_META in bank.meta

    # the ADM vector: pooled text, then the embeddings of (height, width, crop, target) = the images' size
    training = pack.nodes.training
    request = pack.nodes.train_inputs.check_train_inputs(
        2, "xl_thing", "zq xl_thing", "seqlora", 4, 3, 1e-3, 0.05, "attn", 1, 1, "a photo of {trigger}", None, "sdxl"
    )
    data = training.encode_data(model, clip, vae, images, request)
    y = data.conds[0]["y"]
    assert y.shape == (1, 2816) and data.conds[0]["c_crossattn"].shape[-1] == 2048
    pooled = clip.encode_from_tokens_scheduled(clip.tokenize(request.captions[0]))[0][1]["pooled_output"]
    with torch.inference_mode():
        want = model.model.encode_adm(pooled_output=pooled, width=64, height=96).float()
        swapped = model.model.encode_adm(pooled_output=pooled, width=96, height=64).float()
    assert torch.allclose(y, want), "size embeddings of a 96 x 64 image"
    assert not torch.allclose(y, swapped)

    got = _stock_loads_every_key(pack, bank, "xl_thing", loaded, "xl_thing")
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")) for k in got["keys"])
    assert got["meta"]["ss_base_model_version"] == "sdxl_base_v1-0"
    assert got["meta"]["seqlora_layer_naming"] == "ldm"


@pytest.mark.parametrize(("family", "target"), [("sd15", "eps"), ("sd2v", "v")])
def test_the_loss_is_the_models_own_parametrisation(pack, family_checkpoints, tiny_checkpoint, family, target) -> None:
    """The node's loss equals ||eps_hat - eps||^2 for an eps model and ||v_hat - v||^2, v = (eps - sigma x0) /
    sqrt(1 + sigma^2), for a v-prediction model, computed here from the raw UNet output."""
    import comfy.model_management as mm

    path = tiny_checkpoint if family == "sd15" else family_checkpoints[family]
    model, clip, vae = _load(path)
    training, comfy_loss = pack.nodes.training, pack.nodes.comfy_loss
    arch, weighting = training.trainable_family(model)
    assert (arch, weighting) == (family, target)
    request = pack.nodes.train_inputs.check_train_inputs(
        2, "p", "zq p", "seqlora", 4, 1, 1e-3, 0.05, "attn", 0, 2, "a photo of {trigger}", None, arch
    )
    data = training.encode_data(model, clip, vae, _images(2, 64, 64, seed=5), request)
    mm.load_models_gpu([model], force_full_load=True)
    loss_fn = comfy_loss.make_loss(model.model, data, torch.device("cpu"), weighting)
    batch = comfy_loss.make_batches(2, 2, 0, tuple(data.latents.shape[1:]))(4)
    ms = model.model.model_sampling
    with torch.inference_mode():
        got = float(loss_fn(None, batch))
        x0 = data.latents[batch["idx"]]
        sigma = comfy_loss._sigmas(ms, batch["u"]).view(-1, 1, 1, 1)
        eps = batch["noise"]
        x_t = x0 + sigma * eps
        context = torch.cat([data.conds[i]["c_crossattn"] for i in batch["idx"].tolist()])
        raw = model.model.diffusion_model(
            x_t / (sigma**2 + 1).sqrt(), ms.timestep(sigma.flatten()).float(), context=context
        ).float()
        wanted = eps if target == "eps" else (eps - sigma * x0) / (1 + sigma**2).sqrt()
        want = float((raw - wanted).pow(2).mean())
    assert math.isclose(got, want, rel_tol=2e-3), (got, want)


def test_sd2v_trains_and_exports_sd_scripts_names(pack, family_checkpoints) -> None:
    loaded = _load(family_checkpoints["sd2v"])
    assert loaded[0].model.model_type.name == "V_PREDICTION"
    bank, _, loss = _train(pack, loaded, _images(2, 64, 64, seed=7), "v_thing", bank=_layer_bank(loaded[0], "sd2v"))[
        "result"
    ]
    assert bank.architecture == "sd2v" and all(math.isfinite(v) for v in loss["loss"])
    got = _stock_loads_every_key(pack, bank, "v_thing", loaded, "v_thing")
    assert all(
        k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")) for k in got["keys"]
    )
    assert got["meta"]["ss_base_model_version"] == "sd_v2_v"


def _meta_patcher(config_cls, unet_config: dict):
    """A ComfyUI model of a family the node cannot train, full size on the meta device (no memory)."""
    import comfy.model_patcher

    model = config_cls(unet_config).get_model({}, device=torch.device("meta"))
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


FLUX = dict(
    image_model="flux",
    in_channels=16,
    out_channels=16,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=[16, 56, 56],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=True,
)


@pytest.mark.parametrize(("config", "unet_config", "shown"), [("Flux", FLUX, "Flux"), ("WAN21_T2V", {}, "WAN21_T2V")])
def test_models_it_cannot_train_get_a_message_naming_what_it_trains(pack, comfyui, config, unet_config, shown) -> None:
    import comfy.supported_models as sm

    cls = getattr(sm, config)
    patcher = _meta_patcher(cls, {**cls.unet_config, **unet_config})
    with pytest.raises(ValueError) as err:
        _train(pack, (patcher, None, None), _images(1, 64, 64, seed=0), "nope")
    text = str(err.value)
    assert text.startswith("model: ") and shown in text
    assert "SD1.x, SD2.x (512 and 768-v) and SDXL" in text


# --------------------------------------------------------------------------- through workflows


def _workflow(checkpoint: str, folder: str, name: str, layers: str) -> dict[str, Any]:
    """Checkpoint -> image folder -> train (on the layers of bank file `layers`) -> export, and the trained
    model sampled and saved."""
    sampled = sampler_graph(
        checkpoint, ["3", 1], prompt=f"a photo of zq {name}", steps=2, cfg=5.0, prefix=f"fam_{name}"
    )
    return {
        **sampled,
        "11": {"class_type": "SeqLoRALoadBank", "inputs": {"bank_file": layers}},
        "2": {"class_type": "SeqLoRAImageFolder", "inputs": {"folder": folder, "resolution": 64}},
        "3": {
            "class_type": TRAIN,
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "images": ["2", 0],
                "captions": ["2", 1],
                "bank": ["11", 0],
                "concept_name": name,
                "trigger_words": f"zq {name}",
                "method": "seqlora",
                "rank": 4,
                "steps": 3,
                "learning_rate": 1e-3,
                "interference_budget": 0.05,
                "target_preset": "attn",
                "seed": 0,
                "batch_size": 1,
                "caption_template": "a photo of {trigger}",
            },
        },
        "4": {
            "class_type": "SeqLoRAExportLoRA",
            "inputs": {"bank": ["3", 0], "concept_name": "", "filename": name, "dtype": "fp16", "overwrite": True},
        },
    }


def _stock_lora_workflow(checkpoint: str, lora: str) -> dict[str, Any]:
    stock = {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora, "strength_model": 1.0, "strength_clip": 0.0}
    return {
        **sampler_graph(checkpoint, ["2", 0], prefix="fam_stock"),
        "2": {"class_type": "LoraLoader", "inputs": stock},
    }


@pytest.mark.parametrize("family", ["sdxl", "sd2v"])
def test_a_workflow_trains_the_family_and_the_stock_loader_takes_the_export(comfy_server, family_checkpoints, family):
    from safetensors import safe_open

    name = f"wf_{family}"
    link = comfy_server.models / "checkpoints" / CHECKPOINTS[family]
    if not link.exists():
        link.symlink_to(family_checkpoints[family])
    make_images(comfy_server.input_dir / "seqlora" / name, 2, size=64, seed=17, color=(200, 120, 10))
    layers = f"{family}_layers.safetensors"
    _layer_bank(_load(family_checkpoints[family])[0], family).save(comfy_server.models / "seqlora" / layers)
    entry = comfy_server.run(_workflow(CHECKPOINTS[family], f"seqlora/{name}", name, layers), timeout=1800)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    assert entry["outputs"][SAMPLER_OUTPUT]["images"], "the trained model sampled an image"
    lora = comfy_server.models / "loras" / f"{name}.safetensors"
    with safe_open(str(lora), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["seqlora_architecture"] == family
    prefixes = ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_")
    if family == "sd2v":
        prefixes = ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")
    assert all(k.startswith(prefixes) for k in keys)
    before = comfy_server.log_tail(10**7).count("lora key not loaded")
    entry = comfy_server.run(_stock_lora_workflow(CHECKPOINTS[family], lora.name), timeout=900)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    assert comfy_server.log_tail(10**7).count("lora key not loaded") == before, "every key of the export loads"
