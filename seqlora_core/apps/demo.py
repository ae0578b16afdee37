"""The demo: on the embedded toy world, learn concepts one after another with SeqLoRA, then compose them.

Writes to the output folder: the concepts' training images, ``bank.safetensors``, ``grid.png`` (each
concept right after its own training and at the end, and pairs composed in one prompt),
``interference.png`` and ``summary.json`` (identity scores, interference, timings).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ..method.compose import compose
from ..method.report import build_report
from ..method.trainer import TrainCallbacks
from ..toy.concepts import trigger_word
from ..toy.evaluation import EvalSettings, concept_identity, pair_identity, sample
from .bases import TOY, load_base
from .heatmap import write_heatmap_png
from .recipes import TOY_IMAGES, TOY_LR, TOY_STEPS, TOY_TRAIN, learn_toy_concept


def _train_one(pipe, bank, k: int, out: Path, steps: int, seed: int, quiet: bool):
    trigger = trigger_word(k)
    bar = tqdm(total=steps, desc=f"concept {k + 1} '{trigger}'", unit="step", disable=quiet, leave=True)

    def on_step(info) -> None:
        bar.update(info.step - bar.n)
        bar.set_postfix(loss=f"{info.loss:.3f}", interference=f"{info.interference:.3f}", refresh=False)

    bank = learn_toy_concept(
        pipe,
        bank,
        k,
        out / "concepts" / trigger,
        steps=steps,
        lr=TOY_LR,
        seed=seed,
        images=TOY_IMAGES,
        callbacks=TrainCallbacks(on_step=on_step),
        **TOY_TRAIN,
    )
    bar.close()
    return bank


def _grid(rows: list[tuple[str, list[Image.Image]]], scale: int = 3) -> Image.Image:
    font = ImageFont.load_default()
    cell = rows[0][1][0].size[0] * scale
    label_w = max(int(font.getlength(label)) for label, _ in rows) + 12
    cols = max(len(imgs) for _, imgs in rows)
    grid = Image.new("RGB", (label_w + cols * (cell + 2), len(rows) * (cell + 2)), "white")
    d = ImageDraw.Draw(grid)
    for r, (label, imgs) in enumerate(rows):
        y = r * (cell + 2)
        d.text((4, y + cell // 2 - 5), label, fill="black", font=font)
        for c, im in enumerate(imgs):
            grid.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (label_w + c * (cell + 2), y))
    return grid


def run_demo(out: Path, concepts: int = 4, steps: int | None = None, seed: int = 0, quiet: bool = False) -> dict:
    """Learn ``concepts`` toy concepts in sequence, evaluate, and write the outputs. Returns the summary."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = steps or TOY_STEPS
    ev = EvalSettings()
    pipe = load_base(TOY)
    bank = None
    after_own: dict[str, float] = {}
    rows: list[tuple[str, list[Image.Image]]] = []
    own_images = {}
    for k in range(concepts):
        bank = _train_one(pipe, bank, k, out, steps, seed, quiet)
        name = bank.concepts[-1].name
        scores, images = concept_identity(pipe, bank, None, [name], ev)  # the model as it is now
        after_own[name] = scores[name]
        own_images[name] = images
    names = bank.names()
    bank.save(out / "bank.safetensors")
    at_end, end_images = concept_identity(pipe, bank, None, names, ev)
    for i, n in enumerate(names):
        rows.append((f"{n} after its training", own_images[n]))
        rows.append((f"{n} at the end", end_images[i * ev.seeds : (i + 1) * ev.seeds]))
    pairs = [(names[i], names[(i + 1) % len(names)]) for i in range(0, len(names) - 1, 2)] if len(names) > 1 else []
    pair_scores, pair_images = pair_identity(pipe, bank, pairs, ev) if pairs else ([], [])
    for i, (a, b) in enumerate(pairs):
        rows.append((f"{a} + {b}", pair_images[i * ev.seeds : (i + 1) * ev.seeds]))
    rows.extend(_prior_rows(pipe, bank, ev))
    _grid(rows).save(out / "grid.png")
    report = build_report(bank)
    write_heatmap_png(report, out / "interference.png")
    summary = {
        "concepts": names,
        "identity_after_own_training": after_own,
        "identity_at_end": at_end,
        "identity_pairs": pair_scores,
        "mean_identity_after_own": sum(after_own.values()) / len(after_own),
        "mean_identity_at_end": sum(at_end.values()) / len(at_end),
        "mean_relative_interference": report["mean_relative_interference"],
        "train_seconds": {c.name: round(c.timings["total_s"], 2) for c in bank.concepts},
        "steps_per_concept": steps,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "identity_metric": "probability the toy identity CNN gives the prompted concept (chance 1/33)",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if not quiet:
        print(
            f"\nlearned {len(names)} concepts in {summary['wall_seconds']} s; identity after own training "
            f"{summary['mean_identity_after_own']:.3f}, at the end {summary['mean_identity_at_end']:.3f}; "
            f"pairs {[(round(p['left'], 3), round(p['right'], 3)) for p in pair_scores]}"
        )
        written = ", ".join(str(out / f) for f in ("grid.png", "interference.png", "summary.json", "bank.safetensors"))
        print(f"wrote {written}")
    return summary


def _prior_rows(pipe, bank, ev: EvalSettings) -> list[tuple[str, list[Image.Image]]]:
    """A trigger-free prompt on the base model and with every concept composed: the base should survive."""
    prompt = "a red circle on the left and a blue square on the right"
    base = sample(pipe, [prompt], ev)
    with compose(pipe.unet, bank, None, "merged"):
        composed = sample(pipe, [prompt], ev)
    return [("base: red circle + blue square", base), ("same, all concepts on", composed)]
