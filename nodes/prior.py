"""Concept 0 of a new bank from the base model's own world: its statistics while it generates.

What every concept of a bank must leave alone is how the base model behaves on prompts without any
trigger. The Train node measures it once per bank, when the bank has no prior yet: the base model
generates a handful of images at the training resolution with ComfyUI's own sampler, from a generic prompt
(plus an optional class prompt such as "a photo of a dog"), with the empty prompt as the negative, so
classifier-free guidance runs the empty prompt at every step too. The inputs of the adapted layers are
recorded during those passes, over the noise levels of the sampling trajectory, and become the bank's
prior sketches. The concept's own images are never used for it: at image-side layers they would look like
the concept, which is what the prior must not be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import comfy.model_management as mm
import comfy.sample
import comfy.utils
import torch

from ..seqlora_core.method.bank import ConceptBank
from ..seqlora_core.method.stats import MomentRecorder, Sketch, sketches_from_moments
from ..seqlora_core.method.targets import LayerSpec

GENERIC_PROMPTS = ("a photo",)
IMAGES_PER_PROMPT = 2  # generated together as one batch, from different noise
PRIOR_STEPS = 4  # sampler steps per image: the trajectory's noise levels, not a finished picture, matter
PRIOR_CFG = 5.0
PRIOR_SAMPLER = "euler"
PRIOR_SCHEDULER = "normal"
PRIOR_VERSION = 1  # part of the training key: bump when what the prior is built from changes


def prior_prompts(class_prompt: str = "") -> list[str]:
    """The prompts whose generations make the prior: the generic ones and the class prompt, if given."""
    text = " ".join((class_prompt or "").split())
    return [*GENERIC_PROMPTS, *([text] if text and text not in GENERIC_PROMPTS else [])]


def prior_settings(class_prompt: str = "") -> dict:
    """Everything the prior is built from besides the model and the seed (for the training key)."""
    return {
        "version": PRIOR_VERSION,
        "prompts": prior_prompts(class_prompt),
        "images_per_prompt": IMAGES_PER_PROMPT,
        "negative": "",
        "steps": PRIOR_STEPS,
        "cfg": PRIOR_CFG,
        "sampler": [PRIOR_SAMPLER, PRIOR_SCHEDULER],
    }


def generate_prior(
    base,
    encode: Callable[[str], list],
    specs: Sequence[LayerSpec],
    latent_shape: Sequence[int],
    prompts: Sequence[str],
    seed: int,
    sketch_rank: int = 32,
    sketch_energy: float = 0.99,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Sketch]:
    """Sketches of the adapted layers' inputs while ``base`` generates ``IMAGES_PER_PROMPT`` images per prompt.

    ``encode(text)`` is ComfyUI's conditioning of a text; ``latent_shape`` (C, h, w) that of the training
    latents. Progress goes to ComfyUI's progress bar (and ``on_progress(done, total)``), which also
    lets ComfyUI's cancel stop it.
    """
    total = len(prompts) * PRIOR_STEPS
    pbar = comfy.utils.ProgressBar(total)
    negative = encode("")
    diffusion = base.model.diffusion_model
    with MomentRecorder(diffusion, specs) as recorder:
        for i, prompt in enumerate(prompts):

            def callback(step: int, _x0, _x, _total: int, done: int = i * PRIOR_STEPS) -> None:
                pbar.update_absolute(done + step + 1, total)
                if on_progress is not None:
                    on_progress(done + step + 1, total)

            latent = torch.zeros(IMAGES_PER_PROMPT, *latent_shape)
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(int(seed) + i))
            comfy.sample.sample(
                base,
                noise,
                PRIOR_STEPS,
                PRIOR_CFG,
                PRIOR_SAMPLER,
                PRIOR_SCHEDULER,
                encode(prompt),
                negative,
                latent,
                callback=callback,
                disable_pbar=True,
                seed=int(seed) + i,
            )
        moments = recorder.moments()
    mm.throw_exception_if_processing_interrupted()
    with torch.inference_mode(False):
        return sketches_from_moments(
            {n: m.detach().clone().cpu() for n, m in moments.items()}, sketch_rank, sketch_energy
        )


def with_prior(bank: ConceptBank, sketches: dict[str, Sketch]) -> ConceptBank:
    """``bank`` with the base model's sketches as concept 0 (every layer of the bank must have one)."""
    missing = [s.name for s in bank.layers if s.name not in sketches]
    if missing:
        raise RuntimeError(f"no base-model statistics for {len(missing)} layers, e.g. {missing[0]!r}")
    return bank.with_prior({s.name: sketches[s.name] for s in bank.layers})
