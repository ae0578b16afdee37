"""The demo: on the embedded toy world, learn concepts one after another with SeqLoRA, then use them.

Writes to the output folder: the concepts' training images, ``bank.safetensors``, ``grid.png`` (for each
concept its reference images, what it generates alone and with every concept composed; pairs of concepts
in one image, each on its own half; trigger-free prompts on the base model and with every concept on),
``interference.png`` and ``summary.json`` (every number, the settings, timings).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ..method.report import build_report
from ..method.trainer import TrainCallbacks
from ..toy.concepts import trigger_word
from ..toy.evaluation import (
    PRIOR_PROMPTS,
    EvalSettings,
    concept_identity,
    prior_drift,
    region_pair_identity,
    sample,
)
from .bases import TOY, load_base
from .heatmap import write_heatmap_png
from .recipes import TOY_IMAGES, TOY_LR, TOY_STEPS, TOY_TRAIN, learn_toy_concept

DEMO_CONCEPTS = (0, 1, 2, 3, 4, 5, 6, 7)  # the first ``concepts`` of these (4 by default)
SHOWN_PRIOR_PROMPTS = PRIOR_PROMPTS[:2]


def _train_one(pipe, bank, k: int, out: Path, steps: int, seed: int, quiet: bool, method: str = "seqlora"):
    trigger = trigger_word(k)
    bar = tqdm(total=steps, desc=f"{method} '{trigger}'", unit="step", disable=quiet, leave=True)

    def on_step(info) -> None:
        bar.update(info.step - bar.n)
        bar.set_postfix(loss=f"{info.loss:.3f}", interference=f"{info.interference:.3f}", refresh=False)

    bank = learn_toy_concept(
        pipe,
        bank,
        k,
        out / "concepts" / trigger,
        method=method,
        steps=steps,
        lr=TOY_LR,
        seed=seed,
        images=TOY_IMAGES,
        callbacks=TrainCallbacks(on_step=on_step),
        **TOY_TRAIN,
    )
    bar.close()
    return bank


def _grid(rows: list[tuple[str, list[Image.Image]]], groups: list[str], scale: int = 3) -> Image.Image:
    """Rows of labelled images in groups of equal width (headers above the groups)."""
    font = ImageFont.load_default()
    cell = rows[0][1][0].size[0] * scale
    per_group = max(len(imgs) for _, imgs in rows) // len(groups)
    label_w = max(int(font.getlength(label)) for label, _ in rows) + 12
    gap = 10
    width = label_w + len(groups) * (per_group * (cell + 2) + gap)
    top = 16
    grid = Image.new("RGB", (width, top + len(rows) * (cell + 2)), "white")
    d = ImageDraw.Draw(grid)
    for g, title in enumerate(groups):
        d.text((label_w + g * (per_group * (cell + 2) + gap), 2), title, fill="black", font=font)
    for r, (label, imgs) in enumerate(rows):
        y = top + r * (cell + 2)
        d.text((4, y + cell // 2 - 5), label, fill="black", font=font)
        for c, im in enumerate(imgs):
            x = label_w + (c // per_group) * (per_group * (cell + 2) + gap) + (c % per_group) * (cell + 2)
            grid.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
    return grid


def _references(out: Path, trigger: str, n: int) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((out / "concepts" / trigger).glob("*.png"))[:n]]


def _learn_all(pipe, ids, out: Path, steps: int, seed: int, quiet: bool, method: str, ev: EvalSettings):
    bank = None
    after_own = {}
    for k in ids:
        bank = _train_one(pipe, bank, k, out, steps, seed, quiet, method)
        scores, _ = concept_identity(pipe, bank, None, bank.names(), ev)  # the model as it is now
        after_own[bank.names()[-1]] = scores[bank.names()[-1]]
    return bank, after_own


def run_demo(
    out: Path,
    concepts: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    quiet: bool = False,
    compare_lora: bool = False,
) -> dict:
    """Learn the demo's toy concepts in sequence, evaluate, and write the outputs. Returns the summary.

    ``compare_lora`` also learns the same concepts as plain LoRAs and measures how far they move the
    trigger-free prompts, for comparison."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = steps or TOY_STEPS
    if not 1 <= concepts <= len(DEMO_CONCEPTS):
        raise ValueError(f"concepts: {concepts}; the demo learns 1 to {len(DEMO_CONCEPTS)} concepts")
    ids = DEMO_CONCEPTS[:concepts]
    ev = EvalSettings()
    pipe = load_base(TOY)
    base_prior = sample(pipe, PRIOR_PROMPTS, ev)
    bank, after_own = _learn_all(pipe, ids, out, steps, seed, quiet, "seqlora", ev)
    names = bank.names()
    bank.save(out / "bank.safetensors")
    alone, alone_images = {}, {}
    for n in names:
        scores, images = concept_identity(pipe, bank, {n: 1.0}, [n], ev)
        alone[n], alone_images[n] = scores[n], images
    at_end, end_images = concept_identity(pipe, bank, None, names, ev)
    rows: list[tuple[str, list[Image.Image]]] = []
    for i, n in enumerate(names):
        rows.append(
            (n, _references(out, n, ev.seeds) + alone_images[n] + end_images[i * ev.seeds : (i + 1) * ev.seeds])
        )
    pairs = [(names[i], names[i + 1]) for i in range(0, len(names) - 1, 2)]
    pair_scores, pair_images = region_pair_identity(pipe, bank, pairs, ev)
    for i, (a, b) in enumerate(pairs):
        refs = [Image.fromarray(_side_by_side(_references(out, a, 1)[0], _references(out, b, 1)[0]))] * ev.seeds
        rows.append(
            (
                f"{a} | {b}",
                refs
                + pair_images[i * ev.seeds : (i + 1) * ev.seeds]
                + [Image.new("RGB", (32, 32), "white")] * ev.seeds,
            )
        )
    drift = prior_drift(pipe, bank, ev, base_images=base_prior)
    with_all = {}
    from ..method.compose import compose

    with compose(pipe.unet, bank, None, "merged"):
        after = sample(pipe, SHOWN_PRIOR_PROMPTS, ev)
    for k, prompt in enumerate(SHOWN_PRIOR_PROMPTS):
        base_k = base_prior[k * ev.seeds : (k + 1) * ev.seeds]
        with_all[prompt] = after[k * ev.seeds : (k + 1) * ev.seeds]
        rows.append(
            (f"'{prompt[:28]}...'", [Image.new("RGB", (32, 32), "white")] * ev.seeds + base_k + with_all[prompt])
        )
    _grid(rows, ["training images", "generated alone (trigger-free prompts: base model)", "every concept on"]).save(
        out / "grid.png"
    )
    report = build_report(bank)
    write_heatmap_png(report, out / "interference.png")
    summary = {
        "concepts": names,
        "identity_alone": alone,
        "identity_all_composed": at_end,
        "identity_right_after_training": after_own,
        "identity_pairs": pair_scores,
        "prior_drift_pixels": drift,
        "prior_prompts": list(PRIOR_PROMPTS),
        "mean_identity_alone": statistics.mean(alone.values()),
        "mean_identity_all_composed": statistics.mean(at_end.values()),
        "interference_on_earlier": report["mean_relative_interference_on_earlier"],
        "interference_on_later": report["mean_relative_interference_on_later"],
        "delta_norm_ratio": {n: r["mean"] for n, r in report["delta_norm_ratio"].items() if r},
        "budget": report["budget"],
        "train_seconds": {c.name: round(c.timings["total_s"], 2) for c in bank.concepts},
        "settings": {
            "steps": steps,
            "lr": TOY_LR,
            "images": TOY_IMAGES,
            **TOY_TRAIN,
            "seed": seed,
            "eval": vars(ev),
            "torch_threads": torch.get_num_threads(),
        },
        "identity_metric": "probability the toy identity CNN gives the prompted concept (chance 1/65)",
    }
    summary["seqlora_wall_seconds"] = round(time.perf_counter() - t0, 1)  # without the plain-LoRA comparison
    if compare_lora:
        lora_bank, _ = _learn_all(pipe, ids, out / "lora", steps, seed, quiet, "lora", ev)
        summary["lora_prior_drift_pixels"] = prior_drift(pipe, lora_bank, ev, base_images=base_prior)
        summary["lora_identity_all_composed"] = concept_identity(pipe, lora_bank, None, lora_bank.names(), ev)[0]
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not quiet:
        print(
            f"\nlearned {len(names)} concepts in {summary['wall_seconds']} s; identity alone "
            f"{summary['mean_identity_alone']:.3f}, all composed {summary['mean_identity_all_composed']:.3f}; pairs "
            f"{[(round(p['left'], 2), round(p['right'], 2)) for p in pair_scores]}; prior drift {drift:.4f}"
            + (f" (plain LoRAs {summary['lora_prior_drift_pixels']:.4f})" if compare_lora else "")
        )
        written = ", ".join(str(out / f) for f in ("grid.png", "interference.png", "summary.json", "bank.safetensors"))
        print(f"wrote {written}")
    return summary


def _side_by_side(left: Image.Image, right: Image.Image):
    """Two 32 px images squeezed into one: the left half of the first and the right half of the second
    are not what a pair shows, so both are shrunk to half width instead."""
    import numpy as np

    w, h = left.size
    a = np.asarray(left.resize((w // 2, h)))
    b = np.asarray(right.resize((w - w // 2, h)))
    return np.concatenate([a, b], axis=1)
