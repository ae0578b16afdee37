"""Identity evaluation on the toy world: generate with concepts composed, score with the identity CNN."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .bank import Concept, ConceptBank
from .compose import compose
from .dataset import ConceptDataset
from .diffusers_backend import DiffusersConceptData, diffusion_loss, native_resolution
from .toy.concepts import trigger_word, write_concept_folder
from .toy.identity import N_IDENTITY, concept_id_of, identity_probs
from .toy.scenes import scene_dataset
from .trainer import TrainCallbacks, TrainConfig, train_concept

PROMPT = "a photo of {t}"
PAIR_PROMPT = "{a} on the left and {b} on the right"


@dataclass
class EvalSettings:
    """How images are sampled for scoring."""

    seeds: int = 4  # images per prompt
    steps: int = 20
    guidance: float = 5.0
    base_seed: int = 1000


def toy_id(concept: Concept) -> int | None:
    """The toy concept id behind a concept (a trigger that is a reserved toy word the CNN knows), or None."""
    for t in concept.triggers:
        cid = concept_id_of(t)
        if cid is not None and cid < N_IDENTITY:
            return cid
    return None


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
    size = native_resolution(pipe)
    dataset = ConceptDataset.from_folder(folder, trigger, resolution=size)
    data = DiffusersConceptData(pipe, dataset, batch_size=batch_size, seed=seed)
    settings = dict(rank=4, stats_batches=stats_batches, layer_naming="diffusers", architecture="toy") | config
    cfg = TrainConfig(name=trigger, triggers=[trigger], method=method, steps=steps, lr=lr, seed=seed, **settings)
    needs_prior = bank is None or not bank.prior or cfg.prior_loss_weight > 0
    prior = toy_prior_data(pipe, seed=seed).batches if needs_prior else None
    return train_concept(pipe.unet, diffusion_loss, data.batches, cfg, bank, prior, callbacks)


def toy_prior_data(pipe, n: int = 32, seed: int = 0) -> DiffusersConceptData:
    """The base world's own scenes and prompts (every fourth one empty, as classifier-free guidance asks
    for it): what "the model without any concept" must keep doing.

    Their statistics become concept 0 of a new bank (prior preservation); a concept's own images with
    the trigger removed would not do, because at layers that see image features they look like the concept.
    """
    images, prompts, _ = scene_dataset(n, seed=10_000 + seed)
    prompts = ["" if i % 4 == 3 else p for i, p in enumerate(prompts)]  # the empty prompt: guidance's other half
    size = native_resolution(pipe)
    ds = ConceptDataset(
        trigger="",
        resolution=size,
        resize="center_crop",
        pixels_u8=[torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images],
        captions=list(prompts),
        prior_captions=list(prompts),
        repeats=[1] * n,
        original_sizes=[(size, size)] * n,
        crops_top_left=[(0, 0)] * n,
    )
    return DiffusersConceptData(pipe, ds, batch_size=4, seed=seed)


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], ev: EvalSettings) -> list[Image.Image]:
    """``ev.seeds`` images per prompt, prompt-major. Image s of every prompt starts from the same seeded
    noise, whatever else is in the batch, so runs and prompts are comparable."""
    unet = pipe.unet
    size = unet.config.sample_size
    shape = (1, unet.config.in_channels, size, size)
    images: list[Image.Image] = []
    per_seed = []
    for s in range(ev.seeds):
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(ev.base_seed + s))
        latents = noise.expand(len(prompts), -1, -1, -1).to(unet.device, unet.dtype)
        out = pipe(
            prompt=list(prompts),
            num_inference_steps=ev.steps,
            guidance_scale=ev.guidance,
            latents=latents,
            output_type="pil",
        )
        per_seed.append(out.images)
    for p in range(len(prompts)):
        images.extend(per_seed[s][p] for s in range(ev.seeds))
    return images


def _scores(images: Sequence[Image.Image], ids: Sequence[int]) -> list[float]:
    probs = identity_probs(list(images))
    return [float(probs[i, c]) for i, c in enumerate(ids)]


def concept_identity(
    pipe, bank: ConceptBank, selection: Mapping[str, float] | None, names: Sequence[str], ev: EvalSettings
) -> tuple[dict[str, float], list[Image.Image]]:
    """Mean identity probability of each named concept, prompted alone, with ``selection`` composed."""
    concepts = [bank.concept(n) for n in names]
    ids = [toy_id(c) for c in concepts]
    if any(i is None for i in ids):
        raise ValueError("identity needs toy-world concepts (trigger words from seqlora_core.toy)")
    prompts = [PROMPT.format(t=c.triggers[0]) for c in concepts]
    with compose(pipe.unet, bank, selection, "merged"):
        images = sample(pipe, prompts, ev)
    scores = _scores(images, [i for i in ids for _ in range(ev.seeds)])
    return {n: sum(scores[k * ev.seeds : (k + 1) * ev.seeds]) / ev.seeds for k, n in enumerate(names)}, images


def _half(img: Image.Image, left: bool) -> Image.Image:
    """The left (right) half of an image re-centred on a canvas of its own background colour."""
    w, h = img.size
    half = img.crop((0, 0, w // 2, h) if left else (w - w // 2, 0, w, h))
    corner = img.getpixel((0, 0) if left else (w - 1, 0))
    canvas = Image.new("RGB", (w, h), corner)
    canvas.paste(half, (w // 4, 0))
    return canvas


def pair_identity(
    pipe,
    bank: ConceptBank,
    pairs: Sequence[tuple[str, str]],
    ev: EvalSettings,
    selection: Mapping[str, float] | None = None,
) -> tuple[list[dict], list[Image.Image]]:
    """Both concepts of each pair in one prompt ("A on the left and B on the right"), scored per half."""
    prompts, ids = [], []
    for a, b in pairs:
        ca, cb = bank.concept(a), bank.concept(b)
        prompts.append(PAIR_PROMPT.format(a=ca.triggers[0], b=cb.triggers[0]))
        ids.append((toy_id(ca), toy_id(cb)))
    with compose(pipe.unet, bank, selection, "merged"):
        images = sample(pipe, prompts, ev)
    lefts = _scores([_half(im, True) for im in images], [i for i, _ in ids for _ in range(ev.seeds)])
    rights = _scores([_half(im, False) for im in images], [j for _, j in ids for _ in range(ev.seeds)])
    out = []
    for k, (a, b) in enumerate(pairs):
        sl = slice(k * ev.seeds, (k + 1) * ev.seeds)
        out.append({"pair": [a, b], "left": sum(lefts[sl]) / ev.seeds, "right": sum(rights[sl]) / ev.seeds})
    return out, images
