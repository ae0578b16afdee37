"""Exported concepts in ComfyUI's own LoRA loading, on the real SD1.5 and SDXL UNet layouts (full size, on
the meta device: only module names and shapes are needed): whatever naming the bank was trained in, the
file has sd-scripts' names for the family, every key maps onto exactly the bank's layer, with the bank's
factors, and nothing is reported as not loaded."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

SD15 = dict(
    use_checkpoint=False,
    image_size=32,
    use_spatial_transformer=True,
    legacy=False,
    adm_in_channels=None,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    channel_mult=[1, 2, 4, 4],
    transformer_depth_middle=1,
    use_linear_in_transformer=False,
    context_dim=768,
    use_temporal_resblock=False,
    use_temporal_attention=False,
)
SDXL = dict(
    SD15,
    adm_in_channels=2816,
    num_classes="sequential",
    num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    channel_mult=[1, 2, 4],
    transformer_depth_middle=10,
    use_linear_in_transformer=True,
    context_dim=2048,
)
PREFIXES = {  # kohya's sd-scripts: diffusers names for SD1.x/SD2.x, LDM names for SDXL
    "SD15": ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"),
    "SDXL": ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"),
}


def _model(config: str):
    import comfy.supported_models as sm

    unet_config = SD15 if config == "SD15" else SDXL
    return getattr(sm, config)(dict(unet_config)).get_model({}, device=torch.device("meta"))


def _bank(model, trained_in: str):
    from seqlora_core.interop import naming
    from seqlora_core.method.bank import Concept, ConceptBank, ConceptLayer
    from seqlora_core.method.targets import find_targets

    specs = find_targets(model.diffusion_model, "attn_ff") + find_targets(model.diffusion_model, ["*proj_in"])
    g = torch.Generator().manual_seed(1)
    layers = {
        s.name: ConceptLayer(torch.randn(2, s.in_features, generator=g), torch.randn(s.out_features, 2, generator=g))
        for s in specs
    }
    unet_config = model.model_config.unet_config
    meta = {naming.STRUCTURE_META: naming.structure_to_meta(naming.unet_structure(unet_config))}
    arch = "sd15" if type(model.model_config).__name__ == "SD15" else "sdxl"
    bank = ConceptBank(specs, "ldm", arch, {}, [Concept("thing", ["zq"], 2, "seqlora", layers)], meta)
    if trained_in == "diffusers":
        bank = bank.renamed_layers(naming.ldm_to_diffusers_map(unet_config), "diffusers")
        bank = dataclasses.replace(bank, meta=meta)
    return bank


@pytest.mark.parametrize("config", ["SD15", "SDXL"])
@pytest.mark.parametrize("trained_in", ["ldm", "diffusers"])
def test_every_exported_key_maps_onto_its_layer_in_comfyui(
    comfyui, tmp_path: Path, caplog, config: str, trained_in: str
) -> None:
    import comfy.lora
    import comfy.utils

    from seqlora_core.interop.bank_lora import export_concept
    from seqlora_core.interop.naming import ldm_to_diffusers_map

    model = _model(config)
    bank = _bank(model, trained_in)
    ldm_bank = _bank(model, "ldm")
    path = export_concept(bank, "thing", tmp_path / "thing.safetensors", dtype="fp32")
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    assert len(lora) == 3 * len(bank.layers) and all(k.startswith(PREFIXES[config]) for k in lora)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model, {}))
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert set(patches) == {f"diffusion_model.{s.name}.weight" for s in ldm_bank.layers}
    to_bank = {s.name: s.name for s in bank.layers}
    if trained_in == "diffusers":
        to_bank = ldm_to_diffusers_map(model.model_config.unet_config)
    for spec in ldm_bank.layers:
        up, down, alpha = patches[f"diffusion_model.{spec.name}.weight"].weights[:3]
        delta = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
        want = bank.concept("thing").delta(to_bank[spec.name])
        assert torch.allclose(delta, want, atol=1e-5), spec.name
