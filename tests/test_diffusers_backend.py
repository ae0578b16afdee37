"""Diffusers backend on real tiny random models: tokenizer, data cache, loss, loading, sampling."""

from __future__ import annotations

import copy
import math
import shutil
import warnings

import pytest
import torch
from _images import concept_folder
from safetensors.torch import save_file

from seqlora_core.apps.bases import load_base
from seqlora_core.backends.diffusers_backend import (
    DiffusersConceptData,
    diffusion_loss,
    generate,
    load_pipeline,
)
from seqlora_core.backends.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline, load_clip_tokenizer
from seqlora_core.data.dataset import ConceptDataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "2_dog"
    concept_folder(root, [(80, 64), (64, 100), (64, 64)], ["sks dog on grass", None, "a red ball"])
    return ConceptDataset.from_folder(root, "sks", resolution=64)


@pytest.fixture(scope="module")
def sd_eps():
    return build_tiny_pipeline(0, "epsilon")


@pytest.fixture(scope="module")
def sd_v():
    return build_tiny_pipeline(0, "v_prediction")


def test_vendored_tokenizer_matches_clip_ids():
    tok = load_clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a sks dog").input_ids == [49406, 320, 1125, 539, 320, 48136, 1929, 49407]
    padded = tok("", padding="max_length", max_length=77).input_ids
    assert padded[:2] == [49406, 49407] and padded[-1] == 49407 and len(padded) == 77


def test_tiny_pipeline_is_seeded_frozen_and_sized(sd_eps):
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert round(count(sd_eps.unet) / 1e6, 2) == 1.43 and round(count(sd_eps.vae) / 1e6, 2) == 0.66
    assert round(count(sd_eps.text_encoder) / 1e6, 2) == 1.62
    again, other = build_tiny_pipeline(0), build_tiny_pipeline(1)
    pairs = zip(sd_eps.unet.state_dict().values(), again.unet.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(sd_eps.unet.conv_in.weight, other.unet.conv_in.weight)
    assert not any(p.requires_grad for p in sd_eps.unet.parameters())
    assert sd_eps.scheduler.config.prediction_type == "epsilon"


def _encode_counter(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_concept_data_encodes_once_and_is_deterministic(sd_eps, dataset):
    vae_calls, h1 = _encode_counter(sd_eps.vae.encoder)
    text_calls, h2 = _encode_counter(sd_eps.text_encoder)
    try:
        data = DiffusersConceptData(sd_eps, dataset, batch_size=2, seed=0)
        assert len(vae_calls) == len(dataset)  # one VAE pass per image
        n_text = len(text_calls)  # unique captions and prior captions, in chunks
        for step in range(8):
            data.batches(step)
            data.prior_batches(step)
        assert len(vae_calls) == len(dataset) and len(text_calls) == n_text
    finally:
        h1.remove()
        h2.remove()
    assert data.latent_means[0].shape == (4, 32, 32)
    b = data.batches(5)
    assert b["latents"].shape == (2, 4, 32, 32) and b["encoder_hidden_states"].shape == (2, 77, 32)
    fresh = DiffusersConceptData(sd_eps, dataset, batch_size=2, seed=0).batches(5)
    assert fresh["indices"] == b["indices"] and fresh["seed"] == b["seed"]
    assert torch.equal(fresh["latents"], b["latents"])
    assert torch.equal(fresh["encoder_hidden_states"], b["encoder_hidden_states"])
    assert data.batches(6)["seed"] != b["seed"]
    prior = data.prior_batches(5)
    assert prior["indices"] == b["indices"] and torch.equal(prior["latents"], b["latents"])
    assert all("sks" not in c for c in prior["captions"]) and all("sks" in c for c in b["captions"])
    assert not torch.allclose(prior["encoder_hidden_states"], b["encoder_hidden_states"])


def test_one_epoch_visits_each_image_repeats_times(sd_eps, dataset):
    data = DiffusersConceptData(sd_eps, dataset, batch_size=1, seed=3)
    assert data.steps_per_epoch == 6  # 3 images x 2 repeats
    seen = sorted(i for s in range(6) for i in data.indices(s))
    assert seen == sorted(dataset.weighted_indices())
    other_epoch = [data.indices(s)[0] for s in range(6, 12)]
    assert sorted(other_epoch) == seen


def test_no_weighted_images_is_a_clear_error(sd_eps, dataset):
    empty = copy.copy(dataset)
    empty.repeats = [0] * len(dataset)
    with pytest.raises(ValueError, match="no images with repeats >= 1"):
        DiffusersConceptData(sd_eps, empty)


def test_latent_sample_mode_is_seeded_per_step(sd_eps, dataset):
    data = DiffusersConceptData(sd_eps, dataset, batch_size=1, latent_mode="sample")
    a, b = data.batches(0)["latents"], data.batches(0)["latents"]
    assert torch.equal(a, b)
    mean = data.latent_means[data.indices(0)[0]]
    assert not torch.equal(a[0], mean)
    assert not torch.equal(data.batches(6)["latents"], a)  # same image next epoch, fresh draw
    with pytest.raises(ValueError, match="latent_mode"):
        DiffusersConceptData(sd_eps, dataset, latent_mode="mode")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd_eps", "sd_v"])
def test_loss_is_deterministic_and_trainable(kind, dataset, request):
    pipe = request.getfixturevalue(kind)
    data = DiffusersConceptData(pipe, dataset, batch_size=2, seed=0)
    assert data.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    batch = data.batches(0)
    first, again = diffusion_loss(pipe.unet, batch), diffusion_loss(pipe.unet, data.batches(0))
    assert first.ndim == 0 and math.isfinite(first.item())
    assert first.item() == again.item()
    assert diffusion_loss(pipe.unet, data.batches(1)).item() != first.item()
    unet = copy.deepcopy(pipe.unet)
    params = [p.requires_grad_(True) for n, p in unet.named_parameters() if n.endswith("to_q.weight")]
    assert len(params) == 12
    opt = torch.optim.SGD(params, lr=100.0)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = data.loss_fn(unet, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    losses.append(diffusion_loss(unet, batch).item())
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


def test_prediction_type_changes_the_target(sd_eps, sd_v, dataset):
    batch_eps = DiffusersConceptData(sd_eps, dataset, batch_size=2).batches(0)
    batch_v = DiffusersConceptData(sd_v, dataset, batch_size=2).batches(0)
    assert torch.equal(batch_eps["latents"], batch_v["latents"])  # same weights, same data
    assert diffusion_loss(sd_eps.unet, batch_eps).item() != diffusion_loss(sd_v.unet, batch_v).item()


def test_loss_under_bf16_autocast(sd_eps, dataset):
    batch = DiffusersConceptData(sd_eps, dataset, batch_size=2).batches(0)
    ref = diffusion_loss(sd_eps.unet, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = diffusion_loss(sd_eps.unet, batch)
    assert low.dtype == torch.float32 and math.isfinite(low.item())
    assert abs(low.item() - ref.item()) < 0.05 * ref.item()


def test_sdxl_tiny_batches_and_loss(dataset):
    pipe = build_tiny_sdxl_pipeline(0)
    data = DiffusersConceptData(pipe, dataset, batch_size=2)
    batch = data.batches(0)
    added = batch["added_cond_kwargs"]
    assert batch["encoder_hidden_states"].shape == (2, 77, 64)
    assert added["text_embeds"].shape == (2, 32) and added["time_ids"].shape == (2, 6)
    for row, i in zip(added["time_ids"].tolist(), batch["indices"], strict=True):
        assert row == [*dataset.original_sizes[i], *dataset.crops_top_left[i], 64, 64]
    loss = diffusion_loss(pipe.unet, batch)
    assert math.isfinite(loss.item()) and loss.item() == diffusion_loss(pipe.unet, data.batches(0)).item()


@pytest.mark.slow
def test_load_pipeline_round_trips_a_saved_folder(sd_v, dataset, tmp_path):
    sd_v.save_pretrained(tmp_path / "tiny_v")
    loaded = load_pipeline(tmp_path / "tiny_v")
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    for key, value in sd_v.unet.state_dict().items():
        assert torch.equal(value, loaded.unet.state_dict()[key]), key
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert loaded.tokenizer("a photo of a sks dog").input_ids[5] == 48136
    a = DiffusersConceptData(sd_v, dataset, batch_size=2).batches(2)
    b = DiffusersConceptData(loaded, dataset, batch_size=2).batches(2)
    assert torch.equal(a["latents"], b["latents"])
    assert diffusion_loss(sd_v.unet, a).item() == diffusion_loss(loaded.unet, b).item()
    assert type(load_base("tiny")).__name__ == "StableDiffusionPipeline"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        half = load_pipeline(tmp_path / "tiny_v", dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16


def test_load_pipeline_errors_are_clear(sd_eps, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model.*diffusers folder"):
        load_pipeline(tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path / "empty")
    sd_eps.save_pretrained(tmp_path / "partial")
    shutil.rmtree(tmp_path / "partial" / "vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        load_pipeline(tmp_path / "partial")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="ckpt"):
        load_pipeline(tmp_path / "model.ckpt")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="not a full SD/SDXL checkpoint"):
        load_pipeline(tmp_path / "lora.safetensors")


def test_single_file_without_cached_configs_never_downloads(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, tmp_path / "m.safetensors")
    with pytest.raises(RuntimeError, match="not in the local cache.*diffusers folder"):
        load_pipeline(tmp_path / "m.safetensors")


@pytest.mark.slow
def test_generate_is_seeded(sd_eps):
    a = generate(sd_eps, "a photo of sks", seed=1, steps=2, guidance=3.0)
    b = generate(sd_eps, "a photo of sks", seed=1, steps=2, guidance=3.0)
    c = generate(sd_eps, "a photo of sks", seed=2, steps=2, guidance=3.0)
    assert len(a) == 1 and a[0].size == (64, 64) and a[0].mode == "RGB"
    assert a[0].tobytes() == b[0].tobytes() and a[0].tobytes() != c[0].tobytes()


def test_the_prior_is_the_base_models_own_generations(sd_eps, dataset, tmp_path):
    from seqlora_core.apps.recipes import train_from_folder
    from seqlora_core.backends.diffusers_backend import generated_prior_data, prior_prompts
    from seqlora_core.method.trainer import TrainCallbacks, TrainConfig

    prompts = prior_prompts(dataset, "a photo of a dog")
    assert prompts[0] == "a photo of a dog" and prompts[-1] == "" and not any("sks" in p for p in prompts)
    data = generated_prior_data(sd_eps, prompts, resolution=32, images=3, steps=2, seed=1)
    assert data.dataset.captions == prompts[:3] and len(data.dataset) == 3
    again = generated_prior_data(sd_eps, prompts, resolution=32, images=3, steps=2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(data.dataset.pixels_u8, again.dataset.pixels_u8, strict=True))
    assert not any(torch.equal(a, b) for a in data.dataset.pixels_u8 for b in dataset.pixels_u8)

    phases = []
    folder = concept_folder(tmp_path / "c", [(32, 32), (32, 32)])
    cfg = TrainConfig(name="sks", triggers=["sks dog"], steps=1, stats_batches=2, layer_naming="diffusers")
    bank = train_from_folder(
        sd_eps,
        folder,
        "sks dog",
        cfg,
        resolution=32,
        prior_images=2,
        callbacks=TrainCallbacks(on_phase=phases.append),
        class_prompt="a photo of a dog",
    )
    assert phases[:2] == ["prior images", "prior stats"] and bank.prior
    phases.clear()
    cfg2 = TrainConfig(name="zqx", triggers=["zqx hat"], steps=1, stats_batches=2, layer_naming="diffusers")
    train_from_folder(
        sd_eps, folder, "zqx hat", cfg2, bank, resolution=32, callbacks=TrainCallbacks(on_phase=phases.append)
    )
    assert "prior images" not in phases, "generated once per bank"


def test_min_snr_weighting_matches_its_formula(sd_eps, dataset):
    from seqlora_core.backends.diffusers_backend import DiffusersConceptData, diffusion_loss

    data = DiffusersConceptData(sd_eps, dataset, batch_size=1, seed=3)
    for step in range(4):
        batch = data.batches(step)
        plain = float(diffusion_loss(sd_eps.unet, batch))
        sched = batch["scheduler"]
        g = torch.Generator().manual_seed(int(batch["seed"]))
        torch.randn(batch["latents"].shape, generator=g)  # the noise comes first, then the timestep
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g)
        snr = float(sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t]))
        weighted = float(diffusion_loss(sd_eps.unet, batch | {"min_snr_gamma": 5.0}))
        assert weighted == pytest.approx(plain * min(snr, 5.0) / snr, rel=1e-5), (step, snr)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusersConceptData(sd_eps, dataset, min_snr_gamma=0.0)
