"""The denoising loss of a web UI's LDM model, as the closure and batch function the core trainer takes.

The model is what Automatic1111 loads for SD1.x/SD2.x (``ldm.models.diffusion.ddpm.LatentDiffusion``):
``alphas_cumprod`` (the DDPM schedule), ``parameterization`` ("eps" or "v") and
``apply_model(x_t, t, cond)``, which calls ``model.diffusion_model`` (the module the trainer adapts).

A batch is a pure function of the step index (image indices, noise and integer timesteps drawn from a
generator seeded by (seed, step)), so a resumed run replays exactly the same data:

    x_t = sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise
    loss = || out - target ||^2,  target = noise ("eps") or sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * x0 ("v")

which is LDM's own ``q_sample`` and ``get_v`` (and diffusers' ``add_noise`` and ``get_velocity``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

PARAMETERIZATIONS = ("eps", "v")


@dataclass
class LatentData:
    """Latents in model space (N x C x h x w) and one text conditioning per latent (N x T x D)."""

    latents: torch.Tensor
    conds: torch.Tensor
    prior_conds: torch.Tensor


def _step_seed(seed: int, step: int, salt: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7919 + salt) % (2**63 - 1)


def make_batches(
    n_items: int, batch_size: int, seed: int, latent_shape: Sequence[int], num_timesteps: int, prior: bool = False
) -> Callable[[int], dict[str, Any]]:
    """step -> {"idx", "noise", "t", "prior"}: image indices, noise and integer timesteps."""
    if n_items < 1:
        raise ValueError("no training images")
    if batch_size < 1:
        raise ValueError(f"batch size: {batch_size}; use at least 1")
    salt = 1 if prior else 0

    def batch(step: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(_step_seed(seed, step, salt))
        idx = torch.randint(0, n_items, (batch_size,), generator=g)
        noise = torch.randn((batch_size, *latent_shape), generator=g)
        t = torch.randint(0, int(num_timesteps), (batch_size,), generator=g)
        return {"idx": idx, "noise": noise, "t": t, "prior": prior}

    return batch


def _coefficients(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    acp = alphas_cumprod.to(torch.float64)[t.to(alphas_cumprod.device).long()]
    shape = (-1,) + (1,) * (ndim - 1)
    return acp.sqrt().view(shape), (1.0 - acp).sqrt().view(shape)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise (LDM ``q_sample``)."""
    a, s = _coefficients(alphas_cumprod, t, x0.ndim)
    return (a.to(x0.device) * x0.double() + s.to(x0.device) * noise.double()).to(x0.dtype)


def target(
    x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor, parameterization: str
) -> torch.Tensor:
    """What the model predicts: the noise ("eps") or the velocity ("v", LDM ``get_v``)."""
    if parameterization == "eps":
        return noise
    if parameterization == "v":
        a, s = _coefficients(alphas_cumprod, t, x0.ndim)
        return (a.to(x0.device) * noise.double() - s.to(x0.device) * x0.double()).to(x0.dtype)
    raise ValueError(f"parameterization: {parameterization!r}; SeqLoRA trains 'eps' and 'v' models")


def make_loss(sd_model: Any, data: LatentData, device: torch.device) -> Callable[[Any, dict[str, Any]], torch.Tensor]:
    """(module, batch) -> scalar loss of `sd_model` on `data`.

    The module argument is the UNet the trainer adapts; the loss runs through ``sd_model.apply_model``,
    which calls that same module.
    """
    parameterization = getattr(sd_model, "parameterization", "eps")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"this model predicts {parameterization!r}; SeqLoRA trains 'eps' and 'v' models")
    acp = sd_model.alphas_cumprod.detach().to(device, torch.float64)
    latents = data.latents.to(device, torch.float32)
    conds = data.conds.to(device)
    prior = data.prior_conds.to(device)

    def loss_fn(_module: Any, batch: dict[str, Any]) -> torch.Tensor:
        idx = batch["idx"].to(device)
        x0 = latents[idx]
        noise = batch["noise"].to(device, x0.dtype)
        t = batch["t"].to(device)
        x_t = noisy_latents(x0, noise, acp, t)
        cond = (prior if batch.get("prior") else conds)[idx]
        out = sd_model.apply_model(x_t, t, cond).float()
        return (out - target(x0, noise, acp, t, parameterization).float()).pow(2).mean()

    return loss_fn
