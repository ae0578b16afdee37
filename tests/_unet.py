"""A tiny real diffusers UNet with a denoising loss closure, for engine tests (no files, < 1 s)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    ).eval()


class ToyConcept:
    """A 'concept': fixed latents and a fixed text embedding; batches are pure functions of the step."""

    def __init__(self, cid: int, n_images: int = 4, size: int = 8):
        g = torch.Generator().manual_seed(1000 + cid)
        self.latents = torch.randn(n_images, 4, size, size, generator=g)
        self.text = torch.randn(1, 6, 32, generator=g)
        self.prior_text = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(7))
        self.cid = cid

    def batches(self, prior: bool = False):
        def fn(step: int) -> dict:
            g = torch.Generator().manual_seed(hash((self.cid, prior, step)) % 2**62)
            idx = torch.randint(0, self.latents.shape[0], (2,), generator=g)
            text = self.prior_text if prior else self.text
            return {
                "x0": self.latents[idx],
                "text": text.expand(2, -1, -1),
                "noise": torch.randn(2, 4, *self.latents.shape[-2:], generator=g),
                "t": torch.randint(0, 1000, (2,), generator=g),
            }

        return fn


def denoise_loss(unet: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Epsilon-prediction MSE with a linear alpha schedule (enough to exercise the engine)."""
    a = (1 - batch["t"].float() / 1000).view(-1, 1, 1, 1)
    xt = a.sqrt() * batch["x0"] + (1 - a).sqrt() * batch["noise"]
    pred = unet(xt, batch["t"], encoder_hidden_states=batch["text"]).sample
    return torch.nn.functional.mse_loss(pred.float(), batch["noise"])
