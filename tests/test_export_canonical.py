"""Exported concepts carry the names kohya's sd-scripts uses for their family, whatever naming the bank was
trained in: diffusers module names for SD1.x/SD2.x, LDM (SGM) names for SDXL. diffusers' own
``load_lora_weights`` takes every key of them and equals a hand merge, on UNets with the SD1.5 and the SDXL
block layouts (narrow widths, the same module names). ComfyUI's LoraLoader is checked on the same layouts
in ``tests/comfy/test_comfy_export_names.py``."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from seqlora_core.backends.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from seqlora_core.interop import naming
from seqlora_core.interop.bank_lora import canonical_names, export_concept
from seqlora_core.method.bank import Concept, ConceptBank, ConceptLayer
from seqlora_core.method.targets import find_targets

torch.set_num_threads(1)
RANK = 2
TOL = 2e-5

# the SD1.5 and SDXL block layouts (levels, resnets, attention, transformer depths) at small widths
SD15_LAYOUT = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    attention_head_dim=8,
)
SDXL_LAYOUT = dict(
    block_out_channels=(32, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(2, 4, 8),
)
PREFIXES = {
    "diffusers": ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"),
    "ldm": ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"),
}


def _pipeline(layout: str):
    """A tiny SD or SDXL pipeline whose UNet has the real family's block layout."""
    from diffusers import UNet2DConditionModel

    pipe = build_tiny_pipeline(seed=0) if layout == "sd15" else build_tiny_sdxl_pipeline(seed=0)
    cfg = dict(pipe.unet.config) | (SD15_LAYOUT if layout == "sd15" else SDXL_LAYOUT)
    cfg.pop("_use_default_values", None)
    torch.manual_seed(3)
    pipe.unet = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    pipe.unet.requires_grad_(False)
    return pipe


def _bank(unet, layout: str, naming_: str) -> ConceptBank:
    """A bank over the attention projections and proj_in/out of `unet`, in diffusers or LDM names, with one
    concept of random factors (orthonormal A, B of a visible size)."""
    specs = find_targets(unet, ["*attn1.to_q", "*attn1.to_out.0", "*attn2.to_k", "*attn2.to_v", "*proj_in"])
    g = torch.Generator().manual_seed(7)
    layers = {}
    for s in specs:
        a = torch.linalg.qr(torch.randn(s.in_features, RANK, generator=g, dtype=torch.float64))[0].T.float()
        layers[s.name] = ConceptLayer(a.contiguous(), 0.5 * torch.randn(s.out_features, RANK, generator=g))
    arch = "sd15" if layout == "sd15" else "sdxl"
    bank = ConceptBank(specs, "diffusers", arch, {}, [Concept("thing", ["zq thing"], RANK, "seqlora", layers)])
    bank = dataclasses.replace(
        bank, meta={naming.STRUCTURE_META: naming.structure_to_meta(naming.unet_structure(unet))}
    )
    if naming_ == "ldm":
        bank = bank.renamed_layers(naming.diffusers_to_ldm_map(unet), "ldm")
    return bank


def _run(unet, seed: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 8, unet.config.cross_attention_dim, generator=g)
    added = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
        }
    with torch.no_grad():
        return unet(x, torch.tensor([300]), encoder_hidden_states=ctx, added_cond_kwargs=added or None).sample


def _hand_merged(unet, bank: ConceptBank):
    ref = copy.deepcopy(unet)
    to_diffusers = {v: k for k, v in naming.diffusers_to_ldm_map(unet).items()}
    with torch.no_grad():
        for spec in bank.layers:
            name = spec.name if bank.layer_naming == "diffusers" else to_diffusers[spec.name]
            w = ref.get_submodule(name).weight
            w += bank.concept("thing").delta(spec.name).reshape(w.shape)
    return ref


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
@pytest.mark.parametrize("trained_in", ["diffusers", "ldm"])
def test_export_names_are_canonical_and_load_whole_in_diffusers(tmp_path: Path, layout: str, trained_in: str) -> None:
    pipe = _pipeline(layout)
    bank = _bank(pipe.unet, layout, trained_in)
    path = export_concept(bank, "thing", tmp_path / "thing.safetensors", dtype="fp32")
    want = "diffusers" if layout == "sd15" else "ldm"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["seqlora_layer_naming"] == want
    assert all(k.startswith(PREFIXES[want]) for k in keys), [k for k in keys if not k.startswith(PREFIXES[want])][:3]
    assert len(keys) == 3 * len(bank.layers)

    base = _run(pipe.unet)
    expected = _run(_hand_merged(pipe.unet, bank))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # diffusers warns about keys it could not place
        pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="thing")
    injected = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "thing" in m.lora_A}
    assert len(injected) == len(bank.layers), "every key of the file became an adapter"
    got = _run(pipe.unet)
    effect = float((expected - base).abs().max())
    assert effect > 1e-3, "the concept changes the output"
    assert float((got - expected).abs().max()) <= TOL * max(1.0, float(expected.abs().max()))


def test_both_trained_namings_give_the_same_file(tmp_path: Path) -> None:
    pipe = _pipeline("sdxl")
    files = []
    for trained_in in ("diffusers", "ldm"):
        path = export_concept(_bank(pipe.unet, "sdxl", trained_in), "thing", tmp_path / f"{trained_in}.safetensors")
        with safe_open(str(path), "pt") as f:
            files.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_real_layouts_without_a_stored_structure_use_the_family_preset() -> None:
    """Banks saved before the structure was stored: the family's standard layout names them, which is right
    for the real SD1.5/SD2/SDXL UNets; a layer the preset does not know keeps the bank's names with a warning."""
    specs = [dataclasses.replace(s) for s in _bank(_pipeline("sd15").unet, "sd15", "diffusers").layers]
    sd1_ldm = {v: k for k, v in naming.diffusers_to_ldm_map(naming.SD1).items()}
    ldm_specs = [dataclasses.replace(s, name="input_blocks.1.1.transformer_blocks.0.attn1.to_q") for s in specs[:1]]
    bank = ConceptBank(ldm_specs, "ldm", "sd15")
    names, used = canonical_names(bank)
    assert used == "diffusers" and names == {ldm_specs[0].name: sd1_ldm[ldm_specs[0].name]}
    odd = ConceptBank([dataclasses.replace(specs[0], name="input_blocks.99.1.proj_in")], "ldm", "sd15")
    with pytest.warns(UserWarning, match="keeps the bank's names"):
        names, used = canonical_names(odd)
    assert used == "ldm" and names == {"input_blocks.99.1.proj_in": "input_blocks.99.1.proj_in"}
    toy = ConceptBank(specs[:1], "diffusers", "toy")
    assert canonical_names(toy) == ({specs[0].name: specs[0].name}, "diffusers")
