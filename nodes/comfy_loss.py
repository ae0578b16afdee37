"""The denoising loss of a ComfyUI model, as the closure and batch function the core trainer takes.

A batch is a pure function of the step index (image indices, noise and timesteps drawn from a
generator seeded by (seed, step)), so a resumed run replays exactly the same data. The loss goes
through ``BaseModel.apply_model``, which applies the model's own ``model_sampling`` (input scaling,
timestep mapping, eps/v/x0 parametrisation) and returns the denoised x0 estimate.

``eps`` weighting: ||(x0_hat - x0) / sigma||^2, which for x_t = x0 + sigma * eps equals the usual
noise-prediction loss ||eps_hat - eps||^2 of SD training. ``x0``: ||x0_hat - x0||^2 (ComfyUI's own
TrainLoraNode uses this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

WEIGHTINGS = ("eps", "x0")


@dataclass
class DenoiseData:
    """Latents in model space (N x C x h x w) and one text conditioning per latent (1 x T x D each)."""

    latents: torch.Tensor
    conds: Sequence[torch.Tensor]
    prior_conds: Sequence[torch.Tensor]
    pooled: Sequence[torch.Tensor | None] | None = None


def _step_seed(seed: int, step: int, salt: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7919 + salt) % (2**63 - 1)


def _sigmas(ms: Any, u: torch.Tensor) -> torch.Tensor:
    """Sigmas for uniform timestep fractions u in [0, 1) (uniform over the model's timesteps)."""
    if hasattr(ms, "sigma") and hasattr(ms, "sigmas") and ms.sigmas.numel() > 1:
        t = u * (ms.sigmas.numel() - 1)
        return ms.sigma(t).float()
    return torch.tensor([float(ms.percent_to_sigma(float(1 - x))) for x in u])


def make_batches(
    n_items: int, batch_size: int, seed: int, latent_shape: Sequence[int], prior: bool = False
) -> Callable[[int], dict[str, Any]]:
    """step -> {"idx", "noise", "u", "prior"}: image indices, noise and timestep fractions."""
    if n_items < 1:
        raise ValueError("no training images")
    salt = 1 if prior else 0

    def batch(step: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(_step_seed(seed, step, salt))
        idx = torch.randint(0, n_items, (batch_size,), generator=g)
        noise = torch.randn((batch_size, *latent_shape), generator=g)
        u = torch.rand(batch_size, generator=g)
        return {"idx": idx, "noise": noise, "u": u, "prior": prior}

    return batch


def make_loss(
    base_model: Any, data: DenoiseData, device: torch.device, weighting: str = "eps"
) -> Callable[[Any, dict[str, Any]], torch.Tensor]:
    """(module, batch) -> scalar loss of ``base_model`` (a ComfyUI ``BaseModel``) on `data`.

    The module argument is the diffusion model the trainer adapts; the loss runs through
    ``base_model.apply_model`` which calls that same module.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: {weighting!r}; use one of {WEIGHTINGS}")
    ms = base_model.model_sampling
    latents = data.latents.to(device)
    conds = [c.to(device) for c in data.conds]
    prior = [c.to(device) for c in data.prior_conds]

    def loss_fn(_module: Any, batch: dict[str, Any]) -> torch.Tensor:
        idx = batch["idx"].tolist()
        x0 = latents[idx].float()
        noise = batch["noise"].to(device, x0.dtype)
        sigma = _sigmas(ms, batch["u"]).to(device, x0.dtype)
        x_t = ms.noise_scaling(sigma, noise, x0, False)
        table = prior if batch.get("prior") else conds
        context = torch.cat([table[i] for i in idx], 0)
        denoised = base_model.apply_model(x_t, sigma, c_crossattn=context).float()
        diff = denoised - x0
        if weighting == "eps":
            diff = diff / sigma.view(-1, *([1] * (diff.ndim - 1)))
        return diff.pow(2).mean()

    return loss_fn
