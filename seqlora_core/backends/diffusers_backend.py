"""Diffusers pipelines for the trainer: offline loading, cached concept data, the loss, sampling.

Supports UNet pipelines: SD1.x/2.x (`StableDiffusionPipeline`) and SDXL (two text encoders, pooled
text embeddings and added time ids). Nothing here downloads: models come from local files.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.dataset import ConceptDataset
from ..interop.families import SDXL, family_from_diffusers

OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
_HOW = (
    "Pass a local diffusers folder (with model_index.json), a single-file .safetensors checkpoint, or a "
    "built-in base ('toy', 'tiny')."
)


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_pipeline(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    config: str | Path | None = None,
    allow_pickle: bool = False,
) -> Any:
    """Load a pipeline offline from a diffusers folder or a single-file `.safetensors`.

    The built-in bases (`"toy"`, `"tiny"`) are resolved with the files in `seqlora_core.apps.bases`.
    `config` (single files only): a local diffusers folder of the same architecture, used for the
    component configs that `from_single_file` would otherwise fetch from a hub. The returned
    pipeline is in eval mode with every parameter frozen (adapters add their own parameters).
    Raises FileNotFoundError for a missing path or component, ValueError for an unsupported model or for
    pickle weights (``.bin``, ``.pt``, ...: loading them can run code) unless ``allow_pickle``,
    RuntimeError when a single file cannot be converted offline.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}. {_HOW}")
    if path.is_dir():
        pipe = _load_folder(path, dtype, allow_pickle)
    elif path.suffix.lower() == ".safetensors":
        pipe = _load_single_file(path, dtype, config)
    else:
        raise ValueError(f"unsupported model file {path} (only .safetensors; pickled .ckpt is not loaded). {_HOW}")
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise ValueError(f"{path} is not a UNet pipeline with a VAE (SD1.x/2.x/SDXL are supported)")
    return ready_for_training(pipe, device)


def ready_for_training(pipe: Any, device: str | torch.device | None = None) -> Any:
    """Every component in eval mode and frozen (adapters add their own parameters), on ``device``, quiet."""
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.eval().requires_grad_(False)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dtype_kwarg(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name still works, with a warning)."""
    if dtype is None:
        return {}
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (0, 42) else "torch_dtype": dtype}


def pickle_only_components(path: Path, components: list[str]) -> list[str]:
    """The component folders whose weights are pickle files only (no .safetensors beside them)."""
    out = []
    for name in components:
        folder = path / name
        if not folder.is_dir():
            continue
        suffixes = {p.suffix.lower() for p in folder.iterdir() if p.is_file()}
        if suffixes & set(PICKLE_WEIGHTS) and ".safetensors" not in suffixes:
            out.append(name)
    return out


def _load_folder(path: Path, dtype: torch.dtype | None, allow_pickle: bool = False) -> Any:
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder: model_index.json is missing. {_HOW}")
    spec = json.loads(index.read_text(encoding="utf-8"))
    listed = [k for k, v in spec.items() if not k.startswith("_") and isinstance(v, list) and None not in v]
    if "unet" not in listed:
        raise ValueError(f"{path} holds a {spec.get('_class_name')}; SD1.x/2.x/SDXL UNet pipelines are supported")
    absent = [k for k in listed if not (path / k).is_dir()]
    missing = [k for k in absent if k not in OPTIONAL_COMPONENTS]
    if missing:
        raise FileNotFoundError(
            f"{path} lacks the component folder(s) {', '.join(missing)} named in model_index.json: "
            "provide them (e.g. copy them from the model's diffusers release)."
        )
    pickled = pickle_only_components(path, [k for k in listed if k not in absent])
    if pickled and not allow_pickle:
        raise ValueError(
            f"{path}: the weights of {', '.join(pickled)} are pickle files (.bin/.pt), which can run code when "
            "loaded, so they are not read. Convert them to .safetensors, or, if you trust where the model "
            "comes from, allow pickle weights explicitly (--allow-pickle)"
        )
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {k: None for k in absent}
    kwargs["use_safetensors"] = None if allow_pickle else True
    if "requires_safety_checker" in spec and "safety_checker" in absent:
        kwargs["requires_safety_checker"] = False
    kwargs.update(_dtype_kwarg(dtype))
    return DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)


SINGLE_FILE_TYPES = {"v1": False, "v2": False, "xl_base": True}  # diffusers model type -> is SDXL


class _LazyCheckpoint(Mapping):
    """Read-only view of a .safetensors file that loads a tensor only when it is indexed."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set


def _load_single_file(path: Path, dtype: torch.dtype | None, config: str | Path | None) -> Any:
    """SD1.x/2.x/SDXL single file. diffusers' `from_single_file` downloads configs even with
    `local_files_only=True` when they are not cached, so it only ever gets a local config folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, infer_diffusers_model_type

    ckpt = _LazyCheckpoint(path)
    if not any(k.startswith("model.diffusion_model.") for k in ckpt):
        raise ValueError(f"{path} is not a full SD/SDXL checkpoint (no model.diffusion_model.* weights). {_HOW}")
    kind = infer_diffusers_model_type(ckpt)
    if kind not in SINGLE_FILE_TYPES:
        raise ValueError(f"{path} is a {kind!r} checkpoint; single files of SD1.x/2.x/SDXL base models are supported")
    cls = StableDiffusionXLPipeline if SINGLE_FILE_TYPES[kind] else StableDiffusionPipeline
    if config is None:
        repo = fetch_diffusers_config(ckpt)["pretrained_model_name_or_path"]
        config = _cached_config(repo, path)
    elif not Path(config).is_dir():
        raise FileNotFoundError(f"config folder not found: {config} (give a local diffusers folder)")
    kwargs: dict[str, Any] = {"local_files_only": True, "config": str(config)}
    kwargs.update(_dtype_kwarg(dtype))
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as e:  # diffusers raises many types here; all mean "cannot build offline"
        raise RuntimeError(
            f"cannot build a {cls.__name__} from {path} with the configs in {config} "
            f"({type(e).__name__}: {e}). Pass a diffusers folder (with model_index.json) instead."
        ) from e


def _cached_config(repo: str, path: Path) -> str:
    """The locally cached diffusers config snapshot of `repo`, or a clear error (never downloads)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, local_files_only=True)
    except Exception as e:
        raise RuntimeError(
            f"cannot build a pipeline from the single-file checkpoint {path} offline: diffusers needs the "
            f"config and tokenizer files of {repo}, which are not in the local cache ({type(e).__name__}). "
            "Pass a diffusers folder (with model_index.json) instead, or config=<a local diffusers folder "
            "of the same architecture>."
        ) from e


def is_sdxl(pipe: Any) -> bool:
    """True for pipelines whose UNet takes SDXL's pooled text embeddings and time ids."""
    return family_from_diffusers(pipe.unet.config) == SDXL


def training_scheduler(pipe: Any) -> Any:
    """A DDPMScheduler with the pipeline scheduler's config (betas, prediction_type): the forward
    process the UNet was trained with, whatever sampler the pipeline uses."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def derive_seed(seed: int, step: int, stream: str = "") -> int:
    """A 63-bit seed that is a pure function of (seed, step, stream), stable across processes."""
    digest = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class DiffusersConceptData:
    """A concept's latents and text embeddings, encoded once and cached on CPU, served as batches.

    Latents: the VAE posterior mean (`latent_mode="mean"`, default) or, with `latent_mode="sample"`,
    a fresh draw mean + std * eps per step, seeded from (seed, step); both scaled by
    `vae.config.scaling_factor` (after subtracting `shift_factor` when the VAE has one).
    Batches follow epochs: each epoch shuffles the repeat-weighted image list (seeded by the epoch)
    within each image-size bucket and cuts it into batches of `batch_size` (a short last batch is
    filled from the start of its bucket). `batches(step)` is a pure function of `step`.
    """

    def __init__(
        self,
        pipe: Any,
        dataset: ConceptDataset,
        batch_size: int = 1,
        seed: int = 0,
        latent_mode: str = "mean",
        encode_batch_size: int = 8,
        min_snr_gamma: float | None = None,
    ) -> None:
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be a positive number (5 is typical) or None, got {min_snr_gamma}")
        self.min_snr_gamma = min_snr_gamma
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if latent_mode not in ("mean", "sample"):
            raise ValueError(f"latent_mode must be 'mean' or 'sample', got {latent_mode!r}")
        self.dataset, self.batch_size, self.seed, self.latent_mode = dataset, batch_size, seed, latent_mode
        self.sdxl = is_sdxl(pipe)
        self.scheduler = training_scheduler(pipe)
        self.latent_means, self.latent_stds = _encode_images(pipe, dataset)
        _check_latent_sizes(pipe, self.latent_means)
        texts = sorted(set(dataset.captions) | set(dataset.prior_captions))
        self._text = _encode_texts(pipe, texts, self.sdxl, encode_batch_size)
        buckets: dict[tuple[int, ...], list[int]] = {}
        for i in dataset.weighted_indices():
            buckets.setdefault(tuple(self.latent_means[i].shape), []).append(i)
        self._buckets = [buckets[k] for k in sorted(buckets)]
        self.steps_per_epoch = sum(math.ceil(len(b) / batch_size) for b in self._buckets)
        if not self.steps_per_epoch:
            raise ValueError(
                f"the dataset for trigger {dataset.trigger!r} has no images with repeats >= 1 "
                f"({len(dataset)} images); give every image at least one repeat"
            )
        self._plan: tuple[int, list[list[int]]] | None = None

    def indices(self, step: int) -> list[int]:
        """Dataset indices of the batch at `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self._epoch_plan(epoch))
        return self._plan[1][k]

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "epoch"))
        plan = []
        for members in self._buckets:
            perm = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
            for start in range(0, len(perm), self.batch_size):
                plan.append([perm[j % len(perm)] for j in range(start, start + self.batch_size)])
        return [plan[j] for j in torch.randperm(len(plan), generator=g).tolist()]

    def batches(self, step: int) -> dict[str, Any]:
        """The batch at `step` with the training captions' embeddings."""
        return self._batch(step, self.dataset.captions)

    def prior_batches(self, step: int) -> dict[str, Any]:
        """The same images as `batches(step)` with the trigger-free captions' embeddings."""
        return self._batch(step, self.dataset.prior_captions)

    def _batch(self, step: int, captions: list[str]) -> dict[str, Any]:
        idx = self.indices(step)
        latents = torch.stack([self.latent_means[i] for i in idx])
        if self.latent_mode == "sample":
            g = torch.Generator().manual_seed(derive_seed(self.seed, step, "latent"))
            stds = torch.stack([self.latent_stds[i] for i in idx])
            latents = latents + stds * torch.randn(latents.shape, generator=g)
        texts = [captions[i] for i in idx]
        batch: dict[str, Any] = {
            "latents": latents,
            "encoder_hidden_states": torch.stack([self._text[t][0] for t in texts]),
            "seed": derive_seed(self.seed, step, "noise"),
            "step": step,
            "indices": idx,
            "captions": texts,
            "scheduler": self.scheduler,
        }
        if self.min_snr_gamma is not None:
            batch["min_snr_gamma"] = self.min_snr_gamma
        if self.sdxl:
            ds = self.dataset
            time_ids = [(*ds.original_sizes[i], *ds.crops_top_left[i], *ds.size(i)) for i in idx]
            batch["added_cond_kwargs"] = {
                "text_embeds": torch.stack([self._text[t][1] for t in texts]),
                "time_ids": torch.tensor(time_ids, dtype=torch.float32),
            }
        return batch

    @staticmethod
    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """`diffusion_loss`, for the trainer."""
        return diffusion_loss(model, batch)


@torch.no_grad()
def _encode_images(pipe: Any, dataset: ConceptDataset) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    old_dtype = vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        means, stds = [], []
        for i in range(len(dataset)):
            px = dataset.pixels(i)[None].to(vae.device, vae.dtype)
            dist = vae.encode(px).latent_dist
            mean = ((dist.mean.float() - shift) * scale)[0].cpu()
            if not torch.isfinite(mean).all():
                where = dataset.paths[i] if i < len(dataset.paths) else f"image {i}"
                raise FloatingPointError(f"VAE produced non-finite latents for {where}: use an fp32 VAE")
            means.append(mean)
            stds.append((dist.std.float() * scale)[0].cpu())
    finally:
        if upcast:
            vae.to(old_dtype)
    return means, stds


def native_resolution(pipe: Any) -> int:
    """The image side the pipeline's UNet was built for: its sample size times the VAE's factor."""
    size = pipe.unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * int(getattr(pipe, "vae_scale_factor", 8))


def _check_latent_sizes(pipe: Any, latents: list[torch.Tensor]) -> None:
    factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    vae_factor = getattr(pipe, "vae_scale_factor", 8)
    for lat in latents:
        h, w = lat.shape[-2:]
        if h % factor or w % factor:
            raise ValueError(
                f"image size {h * vae_factor}x{w * vae_factor} gives {h}x{w} latents, which this UNet cannot "
                f"downsample: use sizes that are multiples of {factor * vae_factor} pixels"
            )


@torch.no_grad()
def _encode_texts(pipe: Any, texts: list[str], sdxl: bool, chunk: int) -> dict[str, tuple[torch.Tensor, ...]]:
    device = pipe.text_encoder.device
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    for s in range(0, len(texts), chunk):
        part = texts[s : s + chunk]
        if sdxl:
            emb, _, pooled, _ = pipe.encode_prompt(
                prompt=part, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            rows = zip(emb.float().cpu(), pooled.float().cpu(), strict=True)
        else:
            emb = pipe.encode_prompt(part, device, 1, False)[0]
            rows = ((e,) for e in emb.float().cpu())
        out.update(zip(part, rows, strict=True))
    return out


def _param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def diffusion_loss(unet: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Denoising MSE (fp32) of `unet` on a batch from `DiffusersConceptData`.

    Noise and timesteps (uniform over the scheduler's training steps) come from a CPU generator
    seeded with `batch["seed"]`, so a batch always gives the same loss for the same weights.
    Target: the noise (`epsilon`), `scheduler.get_velocity` (`v_prediction`) or the latents
    (`sample`), per `scheduler.config.prediction_type`. With `batch["min_snr_gamma"]` each sample's error
    is weighted by min(SNR, gamma) / SNR (epsilon; / (SNR + 1) for v, 1 for sample) as min-SNR training
    does. Works under `torch.autocast`.
    """
    sched = batch["scheduler"]
    latents = batch["latents"].float()
    g = torch.Generator().manual_seed(int(batch["seed"]))
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g)
    noisy = sched.add_noise(latents, noise, t)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = sched.get_velocity(latents, noise, t)
    elif kind == "sample":
        target = latents
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    p = _param(unet)
    kwargs: dict[str, Any] = {}
    if "added_cond_kwargs" in batch:
        kwargs["added_cond_kwargs"] = {k: v.to(p.device, p.dtype) for k, v in batch["added_cond_kwargs"].items()}
    pred = unet(
        noisy.to(p.device, p.dtype),
        t.to(p.device),
        encoder_hidden_states=batch["encoder_hidden_states"].to(p.device, p.dtype),
        return_dict=False,
        **kwargs,
    )[0]
    err = (pred.float() - target.to(p.device).float()).pow(2)
    gamma = batch.get("min_snr_gamma")
    if gamma is None or kind == "sample":
        return err.mean()
    acp = sched.alphas_cumprod[t].float()
    snr = acp / (1 - acp)
    weight = snr.clamp(max=gamma) / (snr if kind == "epsilon" else snr + 1)
    return (err.mean(dim=tuple(range(1, err.dim()))) * weight.to(err.device)).mean()


@torch.no_grad()
def generate(
    pipe: Any,
    prompt: str | list[str],
    seed: int = 0,
    steps: int = 30,
    guidance: float = 7.5,
    negative_prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images: int = 1,
) -> list[Any]:
    """Sample PIL images; the initial noise comes from a CPU generator seeded with `seed`, so the
    result does not depend on the device's RNG. Size defaults to the pipeline's native size."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: {steps!r}; sampling needs at least 1 step")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance: {guidance!r}; give a finite number (7.5 is typical)")
    g = torch.Generator("cpu").manual_seed(seed)
    out = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        num_images_per_prompt=num_images,
        generator=g,
        output_type="np",
    )
    images = out.images
    if not np.isfinite(images).all():
        raise FloatingPointError(
            "the sampled image holds NaN or infinite values (it would be black): the model or the concepts' "
            "strengths give values out of range; lower the strengths or use fp32"
        )
    return list(pipe.numpy_to_pil(images))


def prior_prompts(dataset: ConceptDataset, class_prompt: str | None = None, limit: int = 8) -> list[str]:
    """Trigger-free prompts of the base model's own world for a concept: its captions with the trigger
    removed (distinct, first ``limit``), the class prompt when given, and the empty prompt (guidance's
    other half)."""
    prompts = list(dict.fromkeys(p for p in dataset.prior_captions if p.strip()))[:limit]
    if class_prompt and class_prompt.strip():
        prompts.insert(0, class_prompt.strip())
    return [*prompts, ""]


@torch.no_grad()
def generated_prior_data(
    pipe: Any,
    prompts: list[str],
    resolution: int,
    images: int = 8,
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
    batch_size: int = 4,
    min_snr_gamma: float | None = None,
) -> DiffusersConceptData:
    """The base model's own generations for trigger-free prompts, as training data: concept 0 of a new bank.

    ``images`` samples at ``resolution`` cycle through ``prompts`` (seeded, ``steps`` sampling steps). A
    concept's own images with the trigger removed would not do as the prior: at layers that see image
    features they look like the concept.
    """
    chosen = [prompts[i % len(prompts)] for i in range(images)]
    pixels = []
    for i, prompt in enumerate(chosen):
        (img,) = generate(
            pipe, prompt, seed=seed * 1000 + i, steps=steps, guidance=guidance, height=resolution, width=resolution
        )
        pixels.append(torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous())
    ds = ConceptDataset(
        trigger="",
        resolution=resolution,
        resize="center_crop",
        pixels_u8=pixels,
        captions=list(chosen),
        prior_captions=list(chosen),
        repeats=[1] * images,
        original_sizes=[(resolution, resolution)] * images,
        crops_top_left=[(0, 0)] * images,
    )
    return DiffusersConceptData(pipe, ds, batch_size=batch_size, seed=seed, min_snr_gamma=min_snr_gamma)
