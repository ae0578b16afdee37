"""diffusers <-> LDM module-name maps, checked on real diffusers UNets and a hand-verified table."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from _tiny_sd import SD15_CONFIG, SDXL_CONFIG, UNET_CONFIG, tiny_unet

from seqlora_core.interop import naming

torch.set_num_threads(1)

# Read off ComfyUI's `comfy.utils.unet_to_diffusers` and `openaimodel.UNetModel` for the SD1.5 layout:
# input block n = 1 + 3 * level + i, downsampler after the resnets, output block = 3 * up_block + i,
# upsampler at `.1.conv` without attention and `.2.conv` with it.
SD15_TABLE = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj": "input_blocks.8.1.transformer_blocks.0.ff.net.0.proj",  # noqa: E501
    "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
    "mid_block.resnets.0.norm1": "middle_block.0.in_layers.0",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0": "middle_block.1.transformer_blocks.0.attn2.to_out.0",
    "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
    "up_blocks.0.resnets.2.conv_shortcut": "output_blocks.2.0.skip_connection",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks.3.1.transformer_blocks.0.ff.net.2",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
    "up_blocks.3.resnets.2.norm2": "output_blocks.11.0.out_layers.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
SDXL_TABLE = {
    "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
    "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks.8.1.transformer_blocks.9.ff.net.2",
    "mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0": "middle_block.1.transformer_blocks.9.attn1.to_out.0",
    "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v": "output_blocks.2.1.transformer_blocks.9.attn2.to_v",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# ComfyUI's own `unet_config`s for the same models (comfy/supported_models.py)
COMFY_SD15 = {
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
}
COMFY_SDXL = {
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10,
    "adm_in_channels": 2816,
}
LORA_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _weighted_modules(unet) -> set[str]:
    return {n for n, m in unet.named_modules() if n and any(True for _ in m.parameters(recurse=False))}


@pytest.fixture(scope="module")
def sd15():
    return _meta_unet(SD15_CONFIG)


@pytest.fixture(scope="module")
def sdxl():
    return _meta_unet(SDXL_CONFIG)


@pytest.mark.parametrize(
    ("which", "config", "table"),
    [
        ("sd15", SD15_CONFIG, SD15_TABLE),
        ("sdxl", SDXL_CONFIG, SDXL_TABLE),
    ],
)
def test_known_names(request, which, config, table):
    assert set(table) <= _weighted_modules(request.getfixturevalue(which))
    d2l = naming.diffusers_to_ldm_map(config)
    assert {k: d2l[k] for k in table} == table
    l2d = naming.ldm_to_diffusers_map(config)
    assert {v: l2d[v] for v in table.values()} == {v: k for k, v in table.items()}


@pytest.mark.parametrize(("which", "n_targets"), [("sd15", 192), ("sdxl", 722)])
def test_every_module_of_a_full_unet_maps_and_round_trips(request, which, n_targets):
    unet = request.getfixturevalue(which)
    d2l = naming.diffusers_to_ldm_map(unet)
    modules = _weighted_modules(unet)
    assert modules == set(d2l), f"unmapped: {sorted(modules - set(d2l))[:5]}"
    l2d = naming.ldm_to_diffusers_map(unet)
    assert len(l2d) == len(d2l), "the map must be one-to-one"
    assert all(l2d[d2l[k]] == k for k in d2l)
    targets = [n for n in modules if ".attentions." in n and n.endswith(LORA_TARGETS)]
    assert len(targets) == n_targets  # kohya's LoRA-LierLa UNet module count
    kohya = naming.kohya_lookup(set(d2l) | set(l2d))
    assert all(kohya[naming.to_kohya_name(n)] == n for n in targets)


@pytest.mark.parametrize(
    ("diffusers_config", "comfy_config", "preset"),
    [
        (SD15_CONFIG, COMFY_SD15, naming.SD1),
        (SDXL_CONFIG, COMFY_SDXL, naming.SDXL),
    ],
)
def test_structure_from_diffusers_and_comfy_configs_agree(diffusers_config, comfy_config, preset):
    assert naming.unet_structure(diffusers_config) == naming.unet_structure(comfy_config) == preset


def test_tiny_unet_maps_every_module():
    unet = tiny_unet()
    s = naming.unet_structure(unet)
    assert s.down_depths == ((1, 1), (0, 0)) and s.up_depths == ((0, 0, 0), (1, 1, 1)) and s.mid_depth == 1
    d2l = naming.diffusers_to_ldm_map(unet)
    assert _weighted_modules(unet) == set(d2l)
    assert d2l["down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"] == (
        "input_blocks.2.1.transformer_blocks.0.attn1.to_q"
    )
    assert d2l["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert d2l["down_blocks.1.resnets.1.conv1"] == "input_blocks.5.0.in_layers.2"
    assert d2l["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert d2l["up_blocks.1.attentions.2.proj_out"] == "output_blocks.5.1.proj_out"
    assert "up_blocks.1.upsamplers.0.conv" not in d2l
    assert naming.diffusers_to_ldm_map(UNET_CONFIG).items() >= d2l.items()


def test_kohya_names():
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    kohya = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert naming.to_kohya_name(name) == kohya
    assert naming.to_kohya_name("input_blocks.4.1.proj_in", "") == "input_blocks_4_1_proj_in"
    assert naming.kohya_lookup([name])[naming.to_kohya_name(name)] == name
    with pytest.raises(ValueError, match="share the kohya name"):
        naming.kohya_lookup(["a.b_c", "a_b.c"])


def test_rename_and_guess():
    d2l = naming.diffusers_to_ldm_map(naming.SD1)
    assert naming.rename({"conv_in": 1}, d2l) == {"input_blocks.0.0": 1}
    with pytest.raises(KeyError, match="no mapping"):
        naming.rename({"nope": 1}, d2l)
    assert naming.guess_structure(["down_blocks.0.attentions.0.proj_in"]) == naming.SD1
    assert naming.guess_structure(["lora_unet_input_blocks_1_1_proj_in"]) == naming.SD1
    sdxl_only = "down_blocks.2.attentions.0.transformer_blocks.5.attn1.to_q"
    assert naming.guess_structure([sdxl_only]) == naming.SDXL
    assert naming.guess_structure(["lora_unet_output_blocks_0_1_proj_out"]) == naming.SDXL


def test_unsupported_layouts_are_errors():
    bad = dict(UNET_CONFIG, down_block_types=("AttnDownBlock2D", "DownBlock2D"))
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        naming.unet_structure(bad)
    with pytest.raises(TypeError):
        naming.unet_structure(42)
    with pytest.raises(ValueError, match="up block"):
        naming.UNetStructure(((1,),), ((1,),))


@pytest.mark.comfyui
@pytest.mark.parametrize(("which", "comfy_config"), [("sd15", COMFY_SD15), ("sdxl", COMFY_SDXL)])
def test_matches_comfyui_unet_to_diffusers(request, which, comfy_config):
    """Same map as ComfyUI's own converter on every module the real UNet has."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, root)
    try:
        comfy_utils = pytest.importorskip("comfy.utils")
    finally:
        sys.path.remove(root)
    unet = request.getfixturevalue(which)
    comfy = {}
    for d, ldm in comfy_utils.unet_to_diffusers(dict(comfy_config)).items():
        comfy[d.rsplit(".", 1)[0]] = ldm.rsplit(".", 1)[0]
    real = _weighted_modules(unet)
    comfy = {k: v for k, v in comfy.items() if k in real}
    assert naming.diffusers_to_ldm_map(unet) == comfy
