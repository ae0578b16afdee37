"""kohya/PEFT export loads in diffusers' own loader and equals a hand merge; import round-trips."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from _tiny_sd import tiny_pipeline, tiny_unet
from safetensors import safe_open
from safetensors.torch import save_file

from seqlora_core.interop import lora_read, lora_write, naming

torch.set_num_threads(1)
RANK = 4
PROJ = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)
TOL = 2e-5  # max |diffusers-loaded - hand-merged| UNet output, fp32


def _targets(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every attention projection plus every (1x1 conv) proj_in of the tiny UNet."""
    return {n: m for n, m in unet.named_modules() if n.endswith(PROJ) or n.endswith("proj_in")}


def _factors(unet: torch.nn.Module, seed: int = 0):
    """Seeded rank-4 factors: A with orthonormal rows, B random; kernels for the conv layers."""
    g = torch.Generator().manual_seed(seed)
    factors, kernels = {}, {}
    for name, mod in _targets(unet).items():
        w = mod.weight
        m, n = w.shape[0], w[0].numel()
        q, _ = torch.linalg.qr(torch.randn(n, RANK, generator=g))
        factors[name] = (q.T.contiguous(), 0.2 * torch.randn(m, RANK, generator=g))
        if isinstance(mod, torch.nn.Conv2d):
            kernels[name] = tuple(mod.kernel_size)
    return factors, kernels


def _merged(unet, factors):
    ref = copy.deepcopy(unet)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, (a, b) in factors.items():
            w = mods[name].weight
            w += (b @ a).reshape(w.shape)
    return ref


def _run(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10]), encoder_hidden_states=ctx).sample


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def fk(unet):
    return _factors(unet)


def _assert_loads_like_hand_merge(tmp_path: Path, save, factors, label: str, sgm: bool = False):
    pipe = tiny_pipeline(tmp_path)
    merged = _merged(pipe.unet, factors)
    base_out = _run(pipe.unet)
    path = save(tmp_path / "lora" / "concept.safetensors")
    if sgm:  # diffusers maps LDM (SGM) block names only when told the UNet config, as its SDXL pipeline does
        state_dict, _ = pipe.lora_state_dict(str(path), unet_config=pipe.unet.config)
        pipe.load_lora_weights(state_dict)
    else:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    got, want = _run(pipe.unet), _run(merged)
    err = (got - want).abs().max().item()
    effect = (want - base_out).abs().max().item()
    print(f"{label}: max |loaded - hand merged| = {err:.2e}, LoRA effect = {effect:.2e}")
    assert effect > 1e-2, f"{label}: the LoRA barely changes the output ({effect:.2e}); test would be vacuous"
    assert err <= TOL, f"{label}: diffusers-loaded output differs from W + B@A by {err:.2e} > {TOL:.0e}"


def test_kohya_fp32_loads_in_diffusers_like_hand_merge(tmp_path, unet, fk):
    factors, kernels = fk
    assert any(kernels.values()), "the tiny UNet should have conv proj_in layers"

    def save(p):
        return lora_write.save_kohya(p, factors, kernels, ["sks dog"], "dog", dtype="fp32")

    _assert_loads_like_hand_merge(tmp_path, save, factors, "kohya fp32")


def test_kohya_ldm_names_load_in_diffusers_like_hand_merge(tmp_path, unet, fk):
    factors, kernels = fk
    d2l = naming.diffusers_to_ldm_map(unet)
    ldm_factors, ldm_kernels = naming.rename(factors, d2l), naming.rename(kernels, d2l)

    def save(p):
        return lora_write.save_kohya(p, ldm_factors, ldm_kernels, ["sks dog"], "dog", dtype="fp32")

    _assert_loads_like_hand_merge(tmp_path, save, factors, "kohya LDM names fp32", sgm=True)


def test_peft_fp32_loads_in_diffusers_like_hand_merge(tmp_path, unet, fk):
    factors, kernels = fk

    def save(p):
        return lora_write.save_peft(p, factors, kernels, ["sks dog"], "dog", dtype="fp32")

    _assert_loads_like_hand_merge(tmp_path, save, factors, "peft fp32")


def test_kohya_keys_shapes_and_alpha(unet, fk):
    factors, kernels = fk
    sd = lora_write.kohya_state_dict(factors, kernels)
    name = "down_blocks.0.attentions.0.proj_in"
    key = naming.to_kohya_name(name)
    assert key == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert sd[f"{key}.lora_down.weight"].shape == (RANK, 32, 1, 1)
    assert sd[f"{key}.lora_up.weight"].shape == (32, RANK, 1, 1)
    assert sd[f"{key}.alpha"].item() == RANK
    q = naming.to_kohya_name("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    assert sd[f"{q}.lora_down.weight"].shape == (RANK, 32)
    assert len(sd) == 3 * len(factors)


def test_conv3x3_layout_and_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 8 * 9, generator=g), torch.randn(5, 2, generator=g)
    sd = lora_write.kohya_state_dict({"conv_in": (a, b)}, {"conv_in": (3, 3)})
    assert sd["lora_unet_conv_in.lora_down.weight"].shape == (2, 8, 3, 3)
    assert sd["lora_unet_conv_in.lora_up.weight"].shape == (5, 2, 1, 1)
    path = lora_write.save_kohya(
        tmp_path / "c.safetensors", {"conv_in": (a, b)}, {"conv_in": (3, 3)}, [], "c", dtype="fp32"
    )
    got, _, _ = lora_read.read_lora_file(path, name_map=naming.SD1)
    assert torch.equal(got["conv_in"][0], a) and torch.equal(got["conv_in"][1], b)
    with pytest.raises(ValueError, match="in_channels"):
        lora_write.kohya_state_dict({"conv_in": (torch.randn(2, 10), b)}, {"conv_in": (3, 3)})


def test_metadata_carries_triggers_and_seqlora_fields(tmp_path, fk):
    factors, kernels = fk
    extra = {"seqlora_rank": "4", "seqlora_concept_token": "sks", "seqlora_bank_id": "b1"}
    path = lora_write.save_kohya(
        tmp_path / "dog.safetensors",
        factors,
        kernels,
        ["sks dog", "sks"],
        "My dog",
        "sd_v1",
        extra,
        concept_name="dog",
        num_images=5,
    )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "4"
    assert meta["ss_output_name"] == meta["modelspec.title"] == "My dog"
    assert json.loads(meta["ss_tag_frequency"]) == {"dog": {"sks dog": 5, "sks": 5}}
    assert meta["modelspec.trigger_phrase"] == "sks dog, sks"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["ss_num_train_images"] == "5"
    assert {k: meta[k] for k in extra} == extra
    _, meta2, triggers = lora_read.read_lora_file(path)
    assert triggers == ["sks dog", "sks"] and meta2 == meta
    sdxl = lora_write.lora_metadata(factors, ["t"], "x", "sdxl_base_v1-0")
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    with pytest.raises(ValueError, match="base_model_version"):
        lora_write.lora_metadata(factors, ["t"], "x", "sd_v9")
    with pytest.raises(TypeError):
        lora_write.lora_metadata(factors, ["t"], "x", "sd_v1", {"seqlora_rank": 4})


@pytest.mark.parametrize(("fmt", "file_naming"), [("kohya", "diffusers"), ("kohya", "ldm"), ("peft", "diffusers")])
@pytest.mark.parametrize("want", ["diffusers", "ldm"])
def test_read_roundtrips_exactly(tmp_path, unet, fk, fmt, file_naming, want):
    factors, kernels = fk
    d2l = naming.diffusers_to_ldm_map(unet)
    if file_naming == "ldm":
        factors_f, kernels_f = naming.rename(factors, d2l), naming.rename(kernels, d2l)
    else:
        factors_f, kernels_f = factors, kernels
    save = lora_write.save_kohya if fmt == "kohya" else lora_write.save_peft
    path = save(tmp_path / "x.safetensors", factors_f, kernels_f, ["sks"], "x", dtype="fp32")
    got, _, triggers = lora_read.read_lora_file(path, want, name_map=unet)
    expect = factors if want == "diffusers" else naming.rename(factors, d2l)
    assert triggers == ["sks"]
    assert got.keys() == expect.keys()
    for name, (a, b) in expect.items():
        assert torch.equal(got[name][0], a) and torch.equal(got[name][1], b), name
    # without a name map the SD1 preset is guessed; the tiny UNet's attention names agree with it
    guessed, _, _ = lora_read.read_lora_file(path, want)
    assert guessed.keys() == expect.keys()


def test_comfy_trainer_format_folds_alpha(tmp_path, fk):
    factors, kernels = fk
    d2l = naming.diffusers_to_ldm_map(naming.SD1)
    sd = {}
    for name, (a, b) in list(factors.items())[:3]:
        key = "diffusion_model." + d2l[name]
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b
        sd[f"{key}.alpha"] = torch.tensor(2.0 * RANK)  # scale alpha / r = 2
    save_file(sd, str(tmp_path / "comfy.safetensors"))
    got, _, _ = lora_read.read_lora_file(tmp_path / "comfy.safetensors", "diffusers")
    for name, (a, b) in list(factors.items())[:3]:
        assert torch.allclose(got[name][1] @ got[name][0], 2 * (b @ a), atol=1e-6)


def test_peft_default_suffix_and_adapter_alpha(tmp_path, fk):
    factors, _ = fk
    names = [n for n in factors if n.endswith("to_q")][:2]
    sd = {}
    for name in names:
        a, b = factors[name]
        sd[f"unet.{name}.lora_A.default.weight"], sd[f"unet.{name}.lora_B.default.weight"] = a, b
    cfg = {"unet.r": RANK, "unet.lora_alpha": 8, "unet.alpha_pattern": {names[1]: 2}}
    save_file(sd, str(tmp_path / "p.safetensors"), metadata={"lora_adapter_metadata": json.dumps(cfg)})
    got, _, _ = lora_read.read_lora_file(tmp_path / "p.safetensors", "ldm")
    d2l = naming.diffusers_to_ldm_map(naming.SD1)
    for name, scale in zip(names, (8 / RANK, 2 / RANK), strict=True):
        a, b = factors[name]
        assert torch.allclose(got[d2l[name]][1] @ got[d2l[name]][0], scale * (b @ a), atol=1e-6)


def test_text_encoder_keys_ignored_with_warning(tmp_path, fk):
    factors, kernels = fk
    sd = lora_write.kohya_state_dict(factors, kernels)
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(RANK, 32)
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, RANK)
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(4.0)
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 32)
    save_file(sd, str(tmp_path / "te.safetensors"))
    with pytest.warns(UserWarning, match="2 text-encoder LoRA modules ignored"):
        got, _, _ = lora_read.read_lora_file(tmp_path / "te.safetensors")
    assert len(got) == len(factors)


def test_refuses_pickle_and_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match=r"model\.ckpt.*convert it to \.safetensors"):
        lora_read.read_lora_file(tmp_path / "model.ckpt")
    unknown = {"foo.bar.weight": torch.zeros(2, 2), "hada_w1_a": torch.zeros(2)}
    save_file(unknown, str(tmp_path / "u.safetensors"))
    with pytest.raises(ValueError, match=r"u\.safetensors: no usable UNet LoRA keys.*foo\.bar\.weight"):
        lora_read.read_lora_file(tmp_path / "u.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        lora_read.read_lora_file(tmp_path / "junk.safetensors")
    save_file(
        {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 2)},
        str(tmp_path / "te.safetensors"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="only text-encoder keys"):
            lora_read.read_lora_file(tmp_path / "te.safetensors")


def test_incomplete_pair_is_an_error(tmp_path, fk):
    factors, kernels = fk
    sd = lora_write.kohya_state_dict(factors, kernels)
    sd.pop(next(k for k in sd if k.endswith("lora_up.weight")))
    save_file(sd, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="lacks its lora_down or lora_up"):
        lora_read.read_lora_file(tmp_path / "half.safetensors")


@pytest.mark.parametrize(("dtype", "tol"), [("fp16", 1e-3), ("bf16", 8e-3)])
def test_half_precision_save_within_tolerance(tmp_path, fk, dtype, tol):
    factors, kernels = fk
    path = lora_write.save_kohya(tmp_path / "h.safetensors", factors, kernels, ["sks"], "h", dtype=dtype)
    with safe_open(str(path), "pt") as f:
        assert all(f.get_tensor(k).dtype == lora_write.resolve_dtype(dtype) for k in f.keys())  # noqa: SIM118
    got, _, _ = lora_read.read_lora_file(path)
    worst = 0.0
    for name, (a, b) in factors.items():
        dw = b @ a
        rel = ((got[name][1] @ got[name][0] - dw).norm() / dw.norm()).item()
        worst = max(worst, rel)
    assert worst < tol, f"{dtype}: worst relative dW error {worst:.2e} >= {tol:.0e}"


def test_half_precision_keeps_tiny_up_weights(tmp_path):
    """A small B would underflow in fp16; the power-of-two rebalance keeps B @ A accurate."""
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(64, RANK, generator=g))
    a, b = q.T.contiguous(), 1e-6 * torch.randn(64, RANK, generator=g)
    path = lora_write.save_kohya(tmp_path / "t.safetensors", {"conv_in": (a, b)}, None, [], "t")
    got, _, _ = lora_read.read_lora_file(path, name_map=naming.SD1)
    rel = ((got["conv_in"][1] @ got["conv_in"][0] - b @ a).norm() / (b @ a).norm()).item()
    assert rel < 1e-3, f"fp16 relative dW error {rel:.2e}"


def test_atomic_write_leaves_no_temp_and_overwrites(tmp_path, fk):
    factors, kernels = fk
    p = tmp_path / "c.safetensors"
    lora_write.save_kohya(p, factors, kernels, ["a"], "first")
    lora_write.save_kohya(p, factors, kernels, ["b"], "second")
    assert [x.name for x in tmp_path.iterdir()] == ["c.safetensors"]
    assert lora_read.read_lora_file(p)[2] == ["b"]
    with pytest.raises(ValueError, match=r"\.safetensors"):
        lora_write.save_kohya(tmp_path / "c.pt", factors, kernels, ["a"], "x")


def test_unsupported_adapters_and_diffs_are_skipped_with_warnings(tmp_path, fk):
    factors, kernels = fk
    sd = lora_write.kohya_state_dict(factors, kernels)
    names = list(factors)
    sd[f"{naming.to_kohya_name(names[0])}.dora_scale"] = torch.ones(1, 32)
    sd[f"{naming.to_kohya_name(names[1])}.lora_mid.weight"] = torch.ones(RANK, RANK, 3, 3)
    sd["diffusion_model.input_blocks.1.1.norm.diff"] = torch.zeros(32)
    sd["diffusion_model.input_blocks.1.1.norm.diff_b"] = torch.zeros(32)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    with pytest.warns(UserWarning) as record:
        got, _, _ = lora_read.read_lora_file(tmp_path / "mixed.safetensors", name_map=naming.SD1)
    text = " ".join(str(w.message) for w in record)
    assert "2 modules with Tucker (lora_mid) or DoRA" in text and "2 full-weight diff/diff_b" in text
    assert set(got) == set(names[2:])


def test_module_names_resolve_a_non_unet_model(tmp_path):
    a, b = torch.eye(2, 6), torch.randn(3, 2)
    path = lora_write.save_kohya(
        tmp_path / "toy.safetensors", {"blocks.0.mlp_in": (a, b)}, None, ["t"], "toy", dtype="fp32"
    )
    got, _, _ = lora_read.read_lora_file(path, module_names=["blocks.0.mlp_in", "blocks.0.mlp_out"])
    assert torch.equal(got["blocks.0.mlp_in"][1] @ got["blocks.0.mlp_in"][0], b @ a)
    with pytest.raises(ValueError, match="no usable UNet LoRA keys"):
        lora_read.read_lora_file(path)


def test_written_file_is_world_readable(tmp_path, fk):
    factors, kernels = fk
    p = lora_write.save_kohya(tmp_path / "m.safetensors", factors, kernels, ["a"], "m")
    assert p.stat().st_mode & 0o777 == 0o644
