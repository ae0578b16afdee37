"""Identity metric of the toy world: a small CNN that names which concept an image shows.

Classes: concepts ``0 .. N_IDENTITY-1`` and a last "none" class: base scenes, glyphs of other concept ids,
and counterfactuals of the known concepts (a known glyph in other colours, other glyphs in a known
concept's colours), so that neither colour nor shape alone is enough. Trained on renderings only, with
blur, noise and brightness jitter so that it holds on generated images (half of the training images also
pass through the toy VAE). Chance is 1 / (N_IDENTITY + 1).
``python -m seqlora_core.toy.identity`` retrains and validates it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
from torch import nn

from .concepts import (
    COLOUR_PAIRS,
    GLYPHS,
    N_CONCEPTS,
    N_DISTINCT,
    ConceptSpec,
    concept_spec,
    random_tone,
    random_view,
)
from .model import WEIGHTS_DIR
from .scenes import RESOLUTION, scene_dataset

N_IDENTITY = N_DISTINCT  # the concepts with a glyph and a colour pair of their own
NONE = N_IDENTITY
IDENTITY_FILE = "identity.safetensors"
WIDTH = 48  # channels of the identity CNN's first stage
ImagesLike = torch.Tensor | np.ndarray | Sequence[Image.Image]


class SmallCNN(nn.Module):
    """Three conv stages (32x32 -> 4x4) and a linear head per output size."""

    def __init__(self, heads: Sequence[int], width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.heads = nn.ModuleList(nn.Linear(2 * w * 16, n) for n in heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.features(x)
        return [head(h) for head in self.heads]


def to_input(images: ImagesLike) -> torch.Tensor:
    """PIL images, uint8 (N, H, W, 3) arrays or float (N, 3, H, W) tensors in [0, 1] -> (N, 3, 32, 32)."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    else:
        x = torch.stack(
            [
                torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                for im in images
            ]
        )
    if x.shape[-1] != RESOLUTION or x.shape[-2] != RESOLUTION:
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area")
    return (x - 0.5) / 0.5


def augment(img: Image.Image, rng: random.Random) -> np.ndarray:
    """Blur, resampling softness, colour jitter and pixel noise, as seen on generated images."""
    if rng.random() < 0.3:
        small = img.resize((RESOLUTION // 2, RESOLUTION // 2), Image.Resampling.BILINEAR)
        img = small.resize((RESOLUTION, RESOLUTION), Image.Resampling.BILINEAR)
    if rng.random() < 0.6:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2)))
    gain = np.asarray([rng.uniform(0.85, 1.15) for _ in range(3)], dtype=np.float32) * rng.uniform(0.9, 1.1)
    x = np.asarray(img, dtype=np.float32) * gain + rng.uniform(-15, 15)
    x += np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(0, 10), x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def counterfactual(spec: ConceptSpec, rng: random.Random, keep: str) -> ConceptSpec:
    """``spec`` with its colours (``keep="colour"``: another glyph) or its glyph (``keep="glyph"``: another
    colour pair) kept and the other part replaced: an image that must not count as the concept."""
    if keep == "colour":
        others = [g for g in GLYPHS if not np.array_equal(g, spec.glyph)]
        glyph = others[rng.randrange(len(others))]
        return replace(spec, glyph=glyph, tone=random_tone(glyph, np.random.default_rng(rng.randrange(1 << 30))))
    pairs = [p for p in COLOUR_PAIRS if p != (spec.colour1, spec.colour2)]
    c1, c2 = pairs[rng.randrange(len(pairs))]
    return replace(spec, colour1=c1, colour2=c2)


def _is_known(spec: ConceptSpec) -> bool:
    """Whether a spec draws exactly like one of the known concepts (same glyph and colour pair)."""
    for cid in range(N_IDENTITY):
        known = concept_spec(cid)
        if np.array_equal(known.glyph, spec.glyph) and (known.colour1, known.colour2) == (spec.colour1, spec.colour2):
            return True
    return False


def identity_data(
    n_per_concept: int, n_none: int, seed: int, augmented: bool = True, counterfactual_share: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Renderings of every concept plus "none" images; (uint8 images, labels).

    "None" is a quarter base scenes, a quarter glyphs of unknown concept ids and ``counterfactual_share``
    counterfactuals of known concepts (half keep the colours, half keep the glyph)."""
    rng = random.Random(seed)
    aug = augment if augmented else (lambda im, _rng: np.asarray(im))
    images, labels = [], []
    for cid in range(N_IDENTITY):
        spec = concept_spec(cid)
        for _ in range(n_per_concept):
            img, _ = random_view(spec, rng, named=rng.random() < 0.5)
            images.append(aug(img, rng))
            labels.append(cid)
    n_counter = int(n_none * counterfactual_share)
    n_scenes = (n_none - n_counter) // 2
    scenes, _, _ = scene_dataset(n_scenes, seed=seed + 1, allow_held_out=True)
    images += [aug(Image.fromarray(s), rng) for s in scenes]
    for i in range(n_none - n_scenes):
        if i < n_counter:
            spec = counterfactual(concept_spec(rng.randrange(N_IDENTITY)), rng, "colour" if i % 2 else "glyph")
        else:
            spec = concept_spec(rng.randrange(N_IDENTITY, N_CONCEPTS))
            if _is_known(spec):
                spec = counterfactual(spec, rng, "colour")
        images.append(aug(random_view(spec, rng, named=rng.random() < 0.5)[0], rng))
    labels += [NONE] * n_none
    return np.stack(images), np.asarray(labels)


def noise_images(n: int, seed: int) -> np.ndarray:
    """Gaussian, uniform and smooth (upsampled) noise images, uint8 (n, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            x = rng.normal(127, 60, (RESOLUTION, RESOLUTION, 3))
        elif kind == 1:
            x = rng.uniform(0, 255, (RESOLUTION, RESOLUTION, 3))
        else:
            small = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
            x = np.asarray(Image.fromarray(small).resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC))
        out[i] = np.clip(x, 0, 255).astype(np.uint8)
    return out


def fit(
    model: SmallCNN, x: torch.Tensor, ys: list[torch.Tensor], epochs: int, seed: int, batch: int = 128, lr: float = 2e-3
) -> None:
    """Adam with cosine decay on summed cross-entropies of all heads."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            outs = model(x[idx])
            loss = sum(F.cross_entropy(o, y[idx]) for o, y in zip(outs, ys, strict=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


_CACHE: dict[str, SmallCNN] = {}


def load_identity_classifier(path: str | Path | None = None) -> SmallCNN:
    """The committed identity CNN (cached)."""
    p = str(Path(path) if path is not None else WEIGHTS_DIR / IDENTITY_FILE)
    if p not in _CACHE:
        model = SmallCNN([N_IDENTITY + 1], width=WIDTH)
        model.load_state_dict({k: v.float() for k, v in load_file(p).items()})
        _CACHE[p] = model.eval()
    return _CACHE[p]


@torch.no_grad()
def identity_probs(images: ImagesLike, model: SmallCNN | None = None) -> torch.Tensor:
    """Class probabilities (N, N_IDENTITY + 1); the last column is "none"."""
    model = model or load_identity_classifier()
    return model(to_input(images))[0].softmax(-1)


def identity_scores(
    images: ImagesLike, concept_ids: int | Sequence[int], model: SmallCNN | None = None
) -> torch.Tensor:
    """Probability (N,) that image i shows concept ``concept_ids[i]`` (one int applies to all)."""
    probs = identity_probs(images, model)
    ids = [concept_ids] * len(probs) if isinstance(concept_ids, int) else list(concept_ids)
    if len(ids) != len(probs) or not all(0 <= c < N_IDENTITY for c in ids):
        raise ValueError(f"need one concept id in [0, {N_IDENTITY}) per image")
    return probs[torch.arange(len(probs)), torch.as_tensor(ids)]


def identity_accuracy(images: ImagesLike, concept_ids: int | Sequence[int], model: SmallCNN | None = None) -> float:
    """Fraction of images whose most likely class is their concept."""
    probs = identity_probs(images, model)
    ids = torch.as_tensor([concept_ids] * len(probs) if isinstance(concept_ids, int) else list(concept_ids))
    return float((probs.argmax(-1) == ids).float().mean())


def counterfactual_images(seed: int, n_per_concept: int, keep: str) -> tuple[np.ndarray, np.ndarray]:
    """Clean renderings of every known concept's counterfactual (see :func:`counterfactual`); (images, ids
    of the concept each one imitates)."""
    rng = random.Random(seed)
    images, ids = [], []
    for cid in range(N_IDENTITY):
        for _ in range(n_per_concept):
            spec = counterfactual(concept_spec(cid), rng, keep)
            images.append(np.asarray(random_view(spec, rng, named=rng.random() < 0.5)[0]))
            ids.append(cid)
    return np.stack(images), np.asarray(ids)


def validate(
    model: SmallCNN, seed: int = 999, n_per_concept: int = 25, n_noise: int = 330, weights_dir: Path | None = None
) -> dict:
    """Held-out renderings (new seed), their VAE round trips, base scenes, counterfactuals and noise."""
    x, y = identity_data(n_per_concept, n_per_concept * 4, seed)
    probs = identity_probs(x, model)
    pred = probs.argmax(-1).numpy()
    concept = y < NONE
    xc, yc = identity_data(n_per_concept, 0, seed + 1, augmented=False)
    xv = vae_roundtrip(xc, weights_dir)
    noise = noise_images(n_noise, seed)
    targets = [i % N_IDENTITY for i in range(n_noise)]
    nprobs = identity_probs(noise, model)
    out = {
        "heldout_concept_accuracy": float((pred[concept] == y[concept]).mean()),
        "heldout_clean_accuracy": identity_accuracy(xc, yc.tolist(), model),
        "heldout_vae_roundtrip_accuracy": identity_accuracy(xv, yc.tolist(), model),
        "heldout_none_accuracy": float((pred[~concept] == NONE).mean()),
        "noise_target_accuracy": identity_accuracy(noise, targets, model),
        "noise_target_mean_prob": float(identity_scores(noise, targets, model).mean()),
        "noise_predicted_none": float((nprobs.argmax(-1) == NONE).float().mean()),
    }
    for keep in ("colour", "glyph"):
        cx, cids = counterfactual_images(seed + 2, max(2, n_per_concept // 5), keep)
        for tag, images in (("", cx), ("_vae", vae_roundtrip(cx, weights_dir))):
            # how often an imitation is taken for the concept it imitates, and its mean probability
            out[f"counterfactual_same_{keep}{tag}_taken_for_concept"] = identity_accuracy(images, cids.tolist(), model)
            out[f"counterfactual_same_{keep}{tag}_mean_prob"] = float(
                identity_scores(images, cids.tolist(), model).mean()
            )
    out["classes"] = N_IDENTITY + 1
    out["chance"] = 1.0 / (N_IDENTITY + 1)
    return out


@torch.no_grad()
def vae_roundtrip(images: np.ndarray, weights_dir: Path | None = None, batch: int = 256) -> np.ndarray:
    """Encode and decode uint8 images with the toy VAE: the softness of generated images."""
    from .model import load_toy_pipeline

    vae = load_toy_pipeline(weights_dir).vae
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def train_identity(
    out_dir: Path, seed: int = 0, n_per_concept: int = 300, n_none: int = 16000, epochs: int = 12
) -> dict:
    """Train, validate and save the identity CNN (the toy VAE in ``out_dir`` makes the round trips)."""
    t0 = time.time()
    torch.manual_seed(seed)
    x, y = identity_data(n_per_concept, n_none, seed)
    half = np.random.default_rng(seed).random(len(x)) < 0.5
    x[half] = vae_roundtrip(x[half], out_dir)
    model = SmallCNN([N_IDENTITY + 1], width=WIDTH)
    fit(model, to_input(x), [torch.from_numpy(y)], epochs, seed)
    metrics = {"seconds": round(time.time() - t0, 1), "train_images": len(x), **validate(model, weights_dir=out_dir)}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(out_dir / IDENTITY_FILE))
    (out_dir / "identity_info.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _CACHE.clear()
    return metrics


def concept_id_of(trigger: str) -> int | None:
    """The concept id of a reserved trigger word (``zqab`` -> 1), or None for any other word."""
    from .concepts import trigger_words

    words = trigger_words()
    return words.index(trigger) if trigger in words else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(train_identity(args.out, args.seed), indent=2))


if __name__ == "__main__":
    main()
