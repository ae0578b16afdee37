"""Recipes that the command line, the demo and the benchmarks share.

- :func:`train_from_folder`: one concept from a folder of images (and captions) into a bank, on a
  diffusers pipeline, with the right trigger-free prior (the toy world's own scenes on the toy base, the
  base model's own generations for trigger-free prompts elsewhere).
- :func:`learn_toy_concept` and the ``TOY_*`` settings: a toy-world concept as the demo and the
  benchmarks learn it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..backends import diffusers_backend
from ..backends.diffusers_backend import (
    DiffusersConceptData,
    generated_prior_data,
    native_resolution,
    prior_prompts,
)
from ..data.captions import DEFAULT_TEMPLATE
from ..data.dataset import ConceptDataset
from ..interop.naming import STRUCTURE_META, structure_to_meta, unet_structure
from ..method.bank import ConceptBank
from ..method.trainer import BatchFn, TrainCallbacks, TrainConfig, train_concept
from ..toy.concepts import trigger_word, write_concept_folder
from ..toy.evaluation import toy_prior_data
from ..toy.model import TRAIN_LOSS
from .bases import TOY

# How the demo and the benchmarks learn a toy concept. Attention and feed-forward of every transformer
# block: a rank-4 LoRA on attention alone learns a toy glyph only partly (its colours, rarely its
# pattern); with the feed-forward layers it learns both.
TOY_STEPS = 250
TOY_LR = 1e-2
TOY_IMAGES = 8
TOY_TRAIN = {"targets": "attn_ff", "rank": 4}


def needs_prior(bank: ConceptBank | None, config: TrainConfig) -> bool:
    """Whether training ``config`` into ``bank`` reads trigger-free batches: for the base model's statistics
    (concept 0, once per bank) or for the prior-preservation loss."""
    return bank is None or not bank.prior or config.prior_loss_weight > 0


def data_signature(dataset: ConceptDataset, batch_size: int, caption_template: str) -> dict:
    """What a concept's batches are made from, for the resume key: digests of the images (pixels as read,
    repeats) and of the captions, the resolution, the batch size and the caption template."""
    images = hashlib.sha256()
    for px, reps in zip(dataset.pixels_u8, dataset.repeats, strict=True):
        images.update(f"{tuple(px.shape)}:{reps}\n".encode())
        images.update(px.numpy().tobytes())
    captions = hashlib.sha256(json.dumps([dataset.captions, dataset.prior_captions]).encode())
    return {
        "images": f"{len(dataset)} images, {images.hexdigest()[:16]}",
        "captions": captions.hexdigest()[:16],
        "resolution": dataset.resolution,
        "batch_size": batch_size,
        "caption_template": caption_template,
    }


def train_from_folder(
    pipe,
    folder: str | Path,
    trigger: str,
    config: TrainConfig,
    bank: ConceptBank | None = None,
    *,
    resolution: int | None = None,
    caption_template: str = DEFAULT_TEMPLATE,
    batch_size: int = 1,
    callbacks: TrainCallbacks | None = None,
    class_prompt: str | None = None,
    prior_images: int = 8,
    min_snr_gamma: float | None = None,
) -> ConceptBank:
    """Learn one concept from ``folder`` into ``bank`` (None: a new bank) and return the new bank.

    Images are read at ``resolution`` (default: the pipeline's own) with the dataset's caption rules; the
    data order and noise follow ``config.seed``. The trigger-free prior is the toy world's own scenes
    when ``config.architecture`` is ``"toy"``, else ``prior_images`` generations of the base model for the
    concept's captions without the trigger, ``class_prompt`` and the empty prompt; it is prepared only when
    the training reads it (:func:`needs_prior`), i.e. once per bank unless a prior loss asks for it.
    ``min_snr_gamma`` weights the loss (min-SNR); the toy world trains with the weighting its pretraining
    used (``TRAIN_LOSS``) unless told otherwise. The data's :func:`data_signature` goes into
    ``config.data_signature`` (the resume key).
    """
    resolution = resolution or native_resolution(pipe)
    dataset = ConceptDataset.from_folder(folder, trigger, caption_template, resolution)
    if min_snr_gamma is None and config.architecture == TOY:
        min_snr_gamma = TRAIN_LOSS["min_snr_gamma"]
    signature = data_signature(dataset, batch_size, caption_template)
    signature["min_snr_gamma"] = min_snr_gamma
    if needs_prior(bank, config) and config.architecture != TOY:
        signature["prior"] = {"class_prompt": class_prompt, "images": prior_images}
    config = dataclasses.replace(config, data_signature=signature)
    data = DiffusersConceptData(pipe, dataset, batch_size=batch_size, seed=config.seed, min_snr_gamma=min_snr_gamma)
    prior: BatchFn | None = None
    if needs_prior(bank, config):
        if config.architecture == TOY:
            prior = toy_prior_data(pipe, seed=config.seed, min_snr_gamma=min_snr_gamma).batches
        else:
            if callbacks is not None and callbacks.on_phase is not None:
                callbacks.on_phase("prior images")
            prompts = prior_prompts(dataset, class_prompt)
            prior = generated_prior_data(
                pipe, prompts, resolution, prior_images, seed=config.seed, batch_size=batch_size
            ).batches
    # the loss is looked up when called, so a test can wrap it
    new_bank = train_concept(pipe.unet, diffusers_backend.diffusion_loss, data.batches, config, bank, prior, callbacks)
    return with_unet_structure(new_bank, pipe.unet)


def with_unet_structure(bank: ConceptBank, unet) -> ConceptBank:
    """The bank with its UNet's block structure in its meta (kept if already there), so its layers can be
    named in every convention on export; unchanged for a UNet whose blocks have no known names."""
    if STRUCTURE_META in bank.meta:
        return bank
    try:
        structure = unet_structure(unet)
    except (TypeError, ValueError, KeyError):
        return bank
    return dataclasses.replace(bank, meta={**bank.meta, STRUCTURE_META: structure_to_meta(structure)})


def learn_toy_concept(
    pipe,
    bank: ConceptBank | None,
    k: int,
    folder: Path,
    method: str = "seqlora",
    steps: int = 150,
    lr: float = 3e-3,
    seed: int = 0,
    images: int = 8,
    stats_batches: int = 4,
    callbacks: TrainCallbacks | None = None,
    batch_size: int = 4,
    **config,
) -> ConceptBank:
    """Toy concept ``k``: write its images to ``folder`` (if absent), learn it into ``bank``, return the new bank.

    ``config`` overrides further ``TrainConfig`` fields (``rank``, ``targets``, ``rho``, ...)."""
    trigger = trigger_word(k)
    if not folder.exists():
        write_concept_folder(k, folder, n=images, seed=seed)
    settings = dict(rank=4, stats_batches=stats_batches, layer_naming="diffusers", architecture=TOY) | config
    cfg = TrainConfig(name=trigger, triggers=[trigger], method=method, steps=steps, lr=lr, seed=seed, **settings)
    return train_from_folder(pipe, folder, trigger, cfg, bank, batch_size=batch_size, callbacks=callbacks)
