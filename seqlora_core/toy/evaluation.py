"""The toy world's evaluation protocol: its own scenes as the prior, and the identity of concepts
generated with a bank composed, scored by the identity CNN.

One protocol for the demo, the benchmarks and ``seqlora_core report --identity``: prompt
``"a photo of <trigger>"`` (pairs: ``"<a> on the left and <b> on the right"``, each half scored), images
from fixed seeded noise (:class:`EvalSettings`), concepts composed merged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..backends.diffusers_backend import DiffusersConceptData, native_resolution
from ..data.dataset import ConceptDataset
from ..method.bank import Concept, ConceptBank
from ..method.compose import compose
from .identity import N_IDENTITY, concept_id_of, identity_probs
from .scenes import scene_dataset

PROMPT = "a photo of {t}"
PAIR_PROMPT = "{a} on the left and {b} on the right"
# Trigger-free prompts that name their background, so that a changed background counts as drift only when
# the prompt asked for another one.
PRIOR_PROMPTS = (
    "a red circle on the left, white background",
    "a blue square at the top and a green ring at the bottom, black background",
    "a big yellow triangle in the center, gray background",
    "a small purple diamond on the right, white background",
    "a cyan cross at the bottom, black background",
    "a orange and pink striped circle in the center, gray background",
)


@dataclass
class EvalSettings:
    """How images are sampled for scoring."""

    seeds: int = 4  # images per prompt
    steps: int = 20
    guidance: float = 5.0
    base_seed: int = 1000


def toy_trigger(concept: Concept) -> tuple[str, int] | None:
    """(trigger, toy concept id) of the first trigger that is a reserved toy word the CNN knows, or None."""
    for t in concept.triggers:
        cid = concept_id_of(t)
        if cid is not None and cid < N_IDENTITY:
            return t, cid
    return None


def toy_id(concept: Concept) -> int | None:
    """The toy concept id behind a concept, or None (see :func:`toy_trigger`)."""
    found = toy_trigger(concept)
    return None if found is None else found[1]


def toy_prior_data(pipe, n: int = 32, seed: int = 0, min_snr_gamma: float | None = None) -> DiffusersConceptData:
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
    return DiffusersConceptData(pipe, ds, batch_size=4, seed=seed, min_snr_gamma=min_snr_gamma)


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
    found = _toy_triggers(bank, names)
    ids = [cid for _, cid in found]
    prompts = [PROMPT.format(t=t) for t, _ in found]
    with compose(pipe.unet, bank, selection, "merged"):
        images = sample(pipe, prompts, ev)
    scores = _scores(images, [i for i in ids for _ in range(ev.seeds)])
    return {n: sum(scores[k * ev.seeds : (k + 1) * ev.seeds]) / ev.seeds for k, n in enumerate(names)}, images


def _toy_triggers(bank: ConceptBank, names: Sequence[str]) -> list[tuple[str, int]]:
    """(trigger, toy id) of each named concept; a clear error for a concept the identity CNN cannot score."""
    found = [toy_trigger(bank.concept(n)) for n in names]
    missing = [n for n, f in zip(names, found, strict=True) if f is None]
    if missing:
        raise ValueError(
            f"identity needs toy-world concepts (trigger words from seqlora_core.toy); {missing[0]!r} has none"
        )
    return found  # type: ignore[return-value]


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
        (ta, ia), (tb, ib) = _toy_triggers(bank, (a, b))
        prompts.append(PAIR_PROMPT.format(a=ta, b=tb))
        ids.append((ia, ib))
    with compose(pipe.unet, bank, selection, "merged"):
        images = sample(pipe, prompts, ev)
    lefts = _scores([_half(im, True) for im in images], [i for i, _ in ids for _ in range(ev.seeds)])
    rights = _scores([_half(im, False) for im in images], [j for _, j in ids for _ in range(ev.seeds)])
    out = []
    for k, (a, b) in enumerate(pairs):
        sl = slice(k * ev.seeds, (k + 1) * ev.seeds)
        out.append({"pair": [a, b], "left": sum(lefts[sl]) / ev.seeds, "right": sum(rights[sl]) / ev.seeds})
    return out, images


@torch.no_grad()
def identity_report(pipe, bank: ConceptBank, n: int = 8, steps: int = 20, guidance: float = 5.0, seed: int = 0) -> dict:
    """Identity of every toy concept in a bank: on the base, alone, and with all concepts composed.

    A concept is scored when one of its trigger words is a reserved toy trigger the classifier knows, with
    this module's protocol (``n`` images from seeds ``seed``, ``seed + 1``, ...). ``accuracy``: the share
    of images the CNN names as the concept; ``mean_prob``: its mean probability for the concept.
    """
    ev = EvalSettings(seeds=n, steps=steps, guidance=guidance, base_seed=seed)
    everyone = {c.name: 1.0 for c in bank.concepts}
    report: dict[str, dict] = {}
    for c in bank.concepts:
        found = toy_trigger(c)
        if found is None:
            continue
        trigger, cid = found

        def score(selection: dict[str, float], trigger: str = trigger, cid: int = cid) -> dict[str, float]:
            with compose(pipe.unet, bank, selection, "merged"):
                probs = identity_probs(sample(pipe, [PROMPT.format(t=trigger)], ev))
            return {
                "accuracy": float((probs.argmax(-1) == cid).float().mean()),
                "mean_prob": float(probs[:, cid].mean()),
            }

        report[c.name] = {
            "trigger": trigger,
            "concept_id": cid,
            "base": score({}),
            "alone": score({c.name: 1.0}),
            "all": score(everyone),
        }
    return report


def prior_drift(
    pipe,
    bank: ConceptBank,
    ev: EvalSettings,
    selection: Mapping[str, float] | None = None,
    base_images: Sequence[Image.Image] | None = None,
) -> float:
    """Mean absolute pixel change (0..1) of the trigger-free :data:`PRIOR_PROMPTS` between the base model and
    the model with ``selection`` (default: every concept) composed: how far the concepts reach prompts
    that do not ask for them."""
    import numpy as np

    base = list(base_images) if base_images is not None else sample(pipe, PRIOR_PROMPTS, ev)
    with compose(pipe.unet, bank, selection, "merged"):
        after = sample(pipe, PRIOR_PROMPTS, ev)
    diffs = [
        float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()) / 255
        for a, b in zip(base, after, strict=True)
    ]
    return sum(diffs) / len(diffs)


def held_out_rows(
    pipe, bank: ConceptBank, folder: Path, seed: int = 777, batches: int = 4, max_rows: int = 2048
) -> dict[str, dict[str, torch.Tensor]]:
    """Input rows of every adapted layer for each toy concept of ``bank``, from views and noise that its
    training never saw (new images in ``folder``/<trigger>, seed ``seed``), with every concept composed:
    what the bound's check runs on."""
    from ..backends.diffusers_backend import diffusion_loss
    from ..method.stats import collect_rows
    from .concepts import write_concept_folder

    out = {}
    size = native_resolution(pipe)
    with compose(pipe.unet, bank, None, "merged"):
        for c in bank.concepts:
            found = toy_trigger(c)
            if found is None:
                continue
            trigger, cid = found
            where = folder / trigger
            if not where.exists():
                write_concept_folder(cid, where, n=4, seed=seed)
            data = DiffusersConceptData(
                pipe, ConceptDataset.from_folder(where, trigger, resolution=size), batch_size=4, seed=seed
            )
            out[c.name] = collect_rows(
                pipe.unet,
                bank.layers,
                lambda i, data=data: diffusion_loss(pipe.unet, data.batches(i)),
                range(batches),
                max_rows,
            )
    return out


@torch.no_grad()
def sample_regions(pipe, left: str, right: str, ev: EvalSettings) -> list[Image.Image]:
    """Two prompts in one image, each bound to its half (regional prompting, as "latent couple" does): at
    every denoising step the conditional prediction is ``left``'s on the left half of the canvas and
    ``right``'s on the right half (a soft seam of two latent pixels), and classifier-free guidance uses the
    empty prompt. ``ev.seeds`` images from the same seeded noise as :func:`sample`."""
    unet, sched = pipe.unet, pipe.scheduler
    size = unet.config.sample_size
    ids = pipe.tokenizer(
        [left, right, ""],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    text = pipe.text_encoder(ids.to(unet.device))[0].to(unet.dtype)
    cols = torch.arange(size, dtype=torch.float32) + 0.5
    weight_left = ((size / 2 - cols) / 2 + 0.5).clamp(0, 1).to(unet.device, unet.dtype).view(1, 1, 1, size)
    images = []
    for s in range(ev.seeds):
        noise = torch.randn(
            (1, unet.config.in_channels, size, size), generator=torch.Generator("cpu").manual_seed(ev.base_seed + s)
        )
        latents = noise.to(unet.device, unet.dtype) * sched.init_noise_sigma
        sched.set_timesteps(ev.steps)
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t).expand(3, -1, -1, -1)
            pred = unet(x, t, encoder_hidden_states=text).sample
            cond = weight_left * pred[0:1] + (1 - weight_left) * pred[1:2]
            latents = sched.step(pred[2:3] + ev.guidance * (cond - pred[2:3]), t, latents).prev_sample
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        images.append(pipe.image_processor.postprocess(decoded, output_type="pil")[0])
    return images


def region_pair_identity(
    pipe,
    bank: ConceptBank,
    pairs: Sequence[tuple[str, str]],
    ev: EvalSettings,
    selection: Mapping[str, float] | None = None,
) -> tuple[list[dict], list[Image.Image]]:
    """Both concepts of each pair in one image, "A on the left" bound to the left half and "B on the right" to
    the right (:func:`sample_regions`, with ``selection`` composed: default every concept), each half scored."""
    out, images = [], []
    with compose(pipe.unet, bank, selection, "merged"):
        for a, b in pairs:
            (ta, ia), (tb, ib) = _toy_triggers(bank, (a, b))
            ims = sample_regions(pipe, f"{ta} on the left", f"{tb} on the right", ev)
            lefts = _scores([_half(im, True) for im in ims], [ia] * len(ims))
            rights = _scores([_half(im, False) for im in ims], [ib] * len(ims))
            out.append({"pair": [a, b], "left": sum(lefts) / len(ims), "right": sum(rights) / len(ims)})
            images += ims
    return out, images
