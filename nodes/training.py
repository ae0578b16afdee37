"""The Train node's data preparation and training inside ComfyUI.

:func:`encode_data`: images -> latents in model space, captions -> text conditionings (the place where
other model families add their extra conditioning). :func:`train_in_comfy`: the core trainer on the
model's ``diffusion_model``, with ComfyUI's progress bar, the live loss chart and its cancel button.
"""

from __future__ import annotations

import math
import time
from typing import Any

import comfy.model_management as mm
import comfy.utils
import torch

from ..seqlora_core.method.bank import ConceptBank
from ..seqlora_core.method.trainer import StepInfo, TrainCallbacks, TrainingCancelled, train_concept
from .comfy_loss import DenoiseData, make_batches, make_loss
from .train_inputs import TrainRequest

LOSS_EVENT = "seqlora.loss"
CHART_EVERY_S = 0.2  # at most this often a loss point goes to the frontend (plus the first and last steps)


def server():
    """ComfyUI's PromptServer, or None outside a server."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def send_event(event: str, data: dict[str, Any]) -> None:
    srv = server()
    if srv is not None:
        srv.send_sync(event, data, getattr(srv, "client_id", None))


def encode_texts(clip, texts: list[str]) -> list[torch.Tensor]:
    """One cross-attention conditioning (1 x T x D) per text; each distinct text is encoded once."""
    cache: dict[str, torch.Tensor] = {}
    for text in texts:
        if text not in cache:
            cache[text] = clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0].detach().float()
    return [cache[t] for t in texts]


def encode_data(base, clip, vae, images: torch.Tensor, request: TrainRequest) -> DenoiseData:
    """Latents of the images (in the model's latent space) and conditionings of the training and the
    trigger-free captions, as normal tensors that autograd may save."""
    with torch.inference_mode():
        latents = base.model.process_latent_in(vae.encode(images[..., :3])).float()
        conds = encode_texts(clip, request.captions)
        prior = encode_texts(clip, request.prior_captions)
    with torch.inference_mode(False):  # clones made here are normal tensors
        return DenoiseData(latents.clone(), [c.clone() for c in conds], [c.clone() for c in prior])


def make_autograd_safe(module: torch.nn.Module) -> None:
    """Replace inference tensors (ComfyUI runs prompts under inference_mode) by normal ones."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.detach().clone()


def _progress(total: int, node_id: str | None) -> TrainCallbacks:
    """ComfyUI's progress bar every step, loss points for the node's chart, and ComfyUI's cancel button."""
    pbar = comfy.utils.ProgressBar(total, node_id=node_id)
    last = {"t": 0.0}

    def on_step(info: StepInfo) -> None:
        now = time.monotonic()
        if now - last["t"] >= CHART_EVERY_S or info.step >= info.total or info.step <= 1:
            last["t"] = now
            loss = info.loss if math.isfinite(info.loss) else None
            point = {"node": node_id, "step": info.step, "total": info.total, "loss": loss}
            send_event(LOSS_EVENT, point | {"interference": info.interference})
        pbar.update_absolute(info.step, info.total)

    return TrainCallbacks(on_step=on_step, should_stop=mm.processing_interrupted)


def train_in_comfy(
    base, data: DenoiseData, request: TrainRequest, bank: ConceptBank | None, node_id: str | None
) -> ConceptBank:
    """Train the request's concept on ``base`` (a ModelPatcher without SeqLoRA patches); returns the new bank.

    A cancel keeps the checkpoint and surfaces as ComfyUI's own interruption.
    """
    cfg = request.config
    mm.load_models_gpu([base], force_full_load=True)  # again: encoding may have offloaded it
    diffusion = base.model.diffusion_model
    with torch.inference_mode(False):
        make_autograd_safe(diffusion)
        loss_fn = make_loss(base.model, data, mm.get_torch_device())
        n, shape = int(data.latents.shape[0]), tuple(data.latents.shape[1:])
        batches = make_batches(n, request.batch_size, cfg.seed, shape)
        prior_batches = make_batches(n, request.batch_size, cfg.seed, shape, prior=True)
        try:
            return train_concept(diffusion, loss_fn, batches, cfg, bank, prior_batches, _progress(cfg.steps, node_id))
        except TrainingCancelled:
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException() from None
        finally:
            mm.soft_empty_cache()
