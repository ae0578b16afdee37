"""The denoising loss of a ComfyUI model, as the closure and batch function the core trainer takes.

A batch is a pure function of the step index (image indices, noise and timesteps drawn from a
generator seeded by (seed, step)), so a resumed run replays exactly the same data. The loss goes
through ``BaseModel.apply_model``, which applies the model's own ``model_sampling`` (input scaling,
timestep mapping, eps/v parametrisation) and returns the denoised x0 estimate; every conditioning the
model takes (cross-attention, and for SDXL the ADM vector ``y`` of pooled text and size embeddings) is
passed by the name ``apply_model`` expects.

Weightings of the x0 error, for x_t = x0 + sigma * eps (sigma_data = 1):

- ``eps``: ||(x0_hat - x0) / sigma||^2 = ||eps_hat - eps||^2, the noise-prediction loss of SD1.x, SD2.x
  (512) and SDXL;
- ``v``: ||x0_hat - x0||^2 (sigma^2 + 1) / sigma^2 = ||v_hat - v||^2, the loss of v-prediction models
  (SD2.x 768-v);
- ``x0``: ||x0_hat - x0||^2 (ComfyUI's own TrainLoraNode uses this).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

WEIGHTINGS = ("eps", "v", "x0")
CROSS_ATTN = "c_crossattn"

Cond = Mapping[str, torch.Tensor]  # apply_model keyword -> tensor with a batch dimension of 1


@dataclass
class DenoiseData:
    """Latents in model space (N x C x h x w) and one conditioning per latent.

    A conditioning maps ``apply_model`` keywords to tensors with batch dimension 1: ``c_crossattn``
    (1 x T x D) always, ``y`` (1 x adm) for models with ADM conditioning (SDXL).
    """

    latents: torch.Tensor
    conds: Sequence[Cond]


def _step_seed(seed: int, step: int, salt: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7919 + salt) % (2**63 - 1)


def _sigmas(ms: Any, u: torch.Tensor) -> torch.Tensor:
    """Sigmas for uniform timestep fractions u in [0, 1) (uniform over the model's timesteps)."""
    if hasattr(ms, "sigma") and hasattr(ms, "sigmas") and ms.sigmas.numel() > 1:
        t = u * (ms.sigmas.numel() - 1)
        return ms.sigma(t).float()
    return torch.tensor([float(ms.percent_to_sigma(float(1 - x))) for x in u])


def make_batches(
    n_items: int, batch_size: int, seed: int, latent_shape: Sequence[int], salt: int = 0
) -> Callable[[int], dict[str, Any]]:
    """step -> {"idx", "noise", "u"}: image indices, noise and timestep fractions."""
    if n_items < 1:
        raise ValueError("no training images")

    def batch(step: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(_step_seed(seed, step, salt))
        idx = torch.randint(0, n_items, (batch_size,), generator=g)
        noise = torch.randn((batch_size, *latent_shape), generator=g)
        u = torch.rand(batch_size, generator=g)
        return {"idx": idx, "noise": noise, "u": u}

    return batch


def concat_conds(conds: Sequence[Cond]) -> dict[str, torch.Tensor]:
    """One batched conditioning from per-item ones. Cross-attention sequences of different lengths
    (a caption longer than 77 tokens) are repeated to their least common multiple, as ComfyUI does:
    repeating the whole sequence does not change attention's result."""
    out: dict[str, torch.Tensor] = {}
    for key in conds[0]:
        parts = [c[key] for c in conds]
        if key == CROSS_ATTN:
            length = math.lcm(*(int(p.shape[1]) for p in parts))
            parts = [p if p.shape[1] == length else p.repeat(1, length // p.shape[1], 1) for p in parts]
        out[key] = torch.cat(parts, 0)
    return out


def weighting_factor(weighting: str, sigma: torch.Tensor) -> torch.Tensor:
    """The factor on ||x0_hat - x0||^2 that turns it into the named loss (per sample)."""
    if weighting == "eps":
        return sigma.pow(-2)
    if weighting == "v":
        return (sigma.pow(2) + 1) / sigma.pow(2)
    if weighting == "x0":
        return torch.ones_like(sigma)
    raise ValueError(f"weighting: {weighting!r}; use one of {WEIGHTINGS}")


def make_loss(
    base_model: Any, data: DenoiseData, device: torch.device, weighting: str = "eps"
) -> Callable[[Any, dict[str, Any]], torch.Tensor]:
    """(module, batch) -> scalar loss of ``base_model`` (a ComfyUI ``BaseModel``) on `data`.

    The module argument is the diffusion model the trainer adapts; the loss runs through
    ``base_model.apply_model`` which calls that same module.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: {weighting!r}; use one of {WEIGHTINGS}")
    if len(data.conds) != int(data.latents.shape[0]):
        raise ValueError(f"{len(data.conds)} conditionings for {int(data.latents.shape[0])} latents")
    ms = base_model.model_sampling
    latents = data.latents.to(device)
    conds = [{k: v.to(device) for k, v in c.items()} for c in data.conds]

    def loss_fn(_module: Any, batch: dict[str, Any]) -> torch.Tensor:
        idx = batch["idx"].tolist()
        x0 = latents[idx].float()
        noise = batch["noise"].to(device, x0.dtype)
        sigma = _sigmas(ms, batch["u"]).to(device, x0.dtype)
        x_t = ms.noise_scaling(sigma, noise, x0, False)
        cond = concat_conds([conds[i] for i in idx])
        denoised = base_model.apply_model(x_t, sigma, **cond).float()
        per_sample = (denoised - x0).pow(2).flatten(1).mean(1)
        return (per_sample * weighting_factor(weighting, sigma)).mean()

    return loss_fn
