"""The Train node's model check, data preparation and training inside ComfyUI.

:func:`trainable_family`: which models the node trains (SD1.x, SD2.x incl. 768-v, SDXL) and the loss
weighting of their parametrisation; anything else is a clear error. :func:`encode_data`: images ->
latents in model space, captions -> every conditioning the model takes (cross-attention; SDXL's pooled
text and size embeddings) through the model's own ``extra_conds``. :func:`train_in_comfy`: the core
trainer on the model's ``diffusion_model``, with ComfyUI's progress bar, the live loss chart and its
cancel button.
"""

from __future__ import annotations

import functools
import math
import time
from collections import OrderedDict
from typing import Any

import comfy.model_management as mm
import comfy.utils
import torch

from ..seqlora_core.interop.families import SD2, SD2V, SD15, SDXL, family_from_comfy
from ..seqlora_core.method.bank import ConceptBank
from ..seqlora_core.method.trainer import StepInfo, TrainCallbacks, TrainingCancelled, train_concept
from .comfy_loss import DenoiseData, make_batches, make_loss
from .train_inputs import TrainRequest

LOSS_EVENT = "seqlora.loss"
STATUS_EVENT = "seqlora.status"  # {node, text, kind}: a line the Train node's chart shows (phase or notice)
CHART_EVERY_S = 0.2  # at most this often a loss point goes to the frontend (plus the first and last steps)
TRAINABLE = (SD15, SD2, SD2V, SDXL)
SUPPORTED_TEXT = "SD1.x, SD2.x (512 and 768-v) and SDXL"
# the prediction of ComfyUI's model_sampling classes -> the loss weighting that is that model's own loss
PREDICTIONS = {"EPS": "eps", "V_PREDICTION": "v"}
_UNSUPPORTED_PREDICTIONS = ("EDM", "X0", "IMG_TO_IMG", "CONST", "COSMOS_RFLOW")


class UnsupportedModelError(ValueError):
    """The Train node cannot train this model (the message names what it supports)."""


@functools.cache
def _prompt_server_class() -> Any:
    """ComfyUI's PromptServer class, or None where ``server`` does not import (looked up once: a failed
    import is not cached by Python and would be retried, and paid for, on every event)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return PromptServer


def server():
    """ComfyUI's PromptServer, or None outside a server."""
    return getattr(_prompt_server_class(), "instance", None)


def send_event(event: str, data: dict[str, Any]) -> None:
    srv = server()
    if srv is not None:
        srv.send_sync(event, data, getattr(srv, "client_id", None))


def send_status(node_id: str | None, text: str, kind: str = "phase") -> None:
    """A line for the Train node's chart: a "phase" (what it is doing; the first loss point clears it) or a
    "notice" that stays (e.g. that changed settings restart a cancelled training)."""
    send_event(STATUS_EVENT, {"node": node_id, "text": text, "kind": kind})


# --------------------------------------------------------------------------- which models


def prediction_of(model_sampling: Any) -> str:
    """The name of a ComfyUI ``model_sampling``'s prediction class (EPS, V_PREDICTION, EDM, CONST, ...)."""
    for cls in type(model_sampling).__mro__:
        if cls.__name__ in PREDICTIONS or cls.__name__ in _UNSUPPORTED_PREDICTIONS:
            return cls.__name__
    return type(model_sampling).__name__


def _describe(base) -> str:
    config = type(base.model.model_config).__name__
    return f"{config} ({type(base.model.diffusion_model).__name__})"


def trainable_family(base) -> tuple[str, str]:
    """(family, loss weighting) of a ModelPatcher the Train node can train; UnsupportedModelError otherwise.

    Trainable: the UNets of SD1.x, SD2.x (eps or v) and SDXL, not their inpainting or unCLIP variants.
    """
    model = base.model
    config = model.model_config
    prediction = prediction_of(base.get_model_object("model_sampling"))
    family = family_from_comfy(type(config).__name__, prediction == "V_PREDICTION")
    unsupported = f"training inside ComfyUI supports {SUPPORTED_TEXT}; this model is {_describe(base)}"
    if family not in TRAINABLE or type(model.diffusion_model).__name__ != "UNetModel":
        raise UnsupportedModelError(
            f"model: {unsupported}. Train on an SD1.x, SD2.x or SDXL checkpoint; models of other "
            "families cannot be trained by this node"
        )
    if config.inpaint_model() or (family != SDXL and getattr(model, "adm_channels", 0)):
        kind = "an inpainting" if config.inpaint_model() else "an unCLIP"
        raise UnsupportedModelError(
            f"model: {unsupported}, {kind} variant, which needs extra image conditioning; train on the "
            "plain base model of that family (its concepts apply to the variant too)"
        )
    if prediction not in PREDICTIONS:
        raise UnsupportedModelError(
            f"model: {unsupported} with {prediction} sampling; the Train node trains eps- and "
            "v-prediction models (remove a ModelSampling node that changes it)"
        )
    return family, PREDICTIONS[prediction]


# --------------------------------------------------------------------------- data


class TextCache:
    """Text conditionings by (text encoder, its patches, text): chained Train nodes share one CLIP, so a
    caption, the empty prompt or a prior prompt is encoded once per session, not once per node."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.items: OrderedDict[tuple, list] = OrderedDict()

    @staticmethod
    def _owner(clip) -> tuple:
        patcher = getattr(clip, "patcher", None)
        return id(getattr(clip, "cond_stage_model", clip)), str(getattr(patcher, "patches_uuid", ""))

    def encode(self, clip, text: str) -> list:
        """ComfyUI's conditioning of `text` ([[cond, {pooled_output, ...}]]); encoded on first use."""
        key = (*self._owner(clip), text)
        hit = self.items.get(key)
        if hit is not None:
            self.items.move_to_end(key)
            return hit
        value = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


TEXTS = TextCache()


def model_conds(base, conditioning: list, width: int, height: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The keywords ``apply_model`` takes for one text conditioning at one image size, from the model's own
    ``extra_conds`` (SDXL: ``y`` = pooled text + size and crop embeddings; every model: ``c_crossattn``)."""
    cond, extras = conditioning[0][0], dict(conditioning[0][1])
    latent_shape = (1, base.model.latent_format.latent_channels, height // 8, width // 8)
    params = {
        **extras,
        "cross_attn": cond,
        "width": width,
        "height": height,
        "device": device,
        "noise": torch.zeros(latent_shape),
    }
    out = base.model.extra_conds(**params)
    return {k: v.cond.detach().float().cpu() for k, v in out.items()}


def encode_data(base, clip, vae, images: torch.Tensor, request: TrainRequest) -> DenoiseData:
    """Latents of the images (in the model's latent space) and the conditionings of the training captions
    at the images' size, as normal tensors that autograd may save."""
    height, width = int(images.shape[1]), int(images.shape[2])
    cpu = torch.device("cpu")
    with torch.inference_mode():
        latents = base.model.process_latent_in(vae.encode(images[..., :3])).float()
        by_text: dict[str, dict[str, torch.Tensor]] = {}
        for text in request.captions:
            if text not in by_text:
                by_text[text] = model_conds(base, TEXTS.encode(clip, text), width, height, cpu)
    with torch.inference_mode(False):  # clones made here are normal tensors
        conds = {t: {k: v.clone() for k, v in c.items()} for t, c in by_text.items()}
        return DenoiseData(latents.clone(), [conds[t] for t in request.captions])


def make_autograd_safe(module: torch.nn.Module) -> None:
    """Replace inference tensors (ComfyUI runs prompts under inference_mode) by normal ones."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.detach().clone()


# --------------------------------------------------------------------------- training


PHASES = {
    "prior stats": "measuring the base model",
    "concept stats": "measuring the concept's images",
    "final stats": "measuring the trained concept",
}


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

    def on_phase(name: str) -> None:
        if name in PHASES:
            send_status(node_id, PHASES[name])
        mm.throw_exception_if_processing_interrupted()

    return TrainCallbacks(on_step=on_step, should_stop=mm.processing_interrupted, on_phase=on_phase)


def train_in_comfy(
    base,
    data: DenoiseData,
    request: TrainRequest,
    bank: ConceptBank | None,
    node_id: str | None,
    weighting: str = "eps",
) -> ConceptBank:
    """Train the request's concept on ``base`` (a ModelPatcher without SeqLoRA patches); returns the new bank.

    A cancel keeps the checkpoint and surfaces as ComfyUI's own interruption.
    """
    cfg = request.config
    mm.load_models_gpu([base], force_full_load=True)  # again: encoding may have offloaded it
    diffusion = base.model.diffusion_model
    with torch.inference_mode(False):
        make_autograd_safe(diffusion)
        loss_fn = make_loss(base.model, data, mm.get_torch_device(), weighting)
        n, shape = int(data.latents.shape[0]), tuple(data.latents.shape[1:])
        batches = make_batches(n, request.batch_size, cfg.seed, shape)
        try:
            return train_concept(diffusion, loss_fn, batches, cfg, bank, None, _progress(cfg.steps, node_id))
        except TrainingCancelled:
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException() from None
        finally:
            mm.soft_empty_cache()
