"""New concepts for the toy world: two-tone glyphs the base model never saw.

Concept ``k`` is a mirror-symmetric 4x4 glyph in two colours, fixed by ``k`` alone, named by the
reserved trigger word ``trigger_word(k)`` (``zqaa`` for 0). The first ``N_DISTINCT`` (64) concepts share
neither glyph nor colour pair with one another. Its training images vary position,
size and background; captions use the base model's scene words, e.g. ``zqab on the left``.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .scenes import BACKGROUNDS, COLOURS, POSITION_PHRASES, POSITIONS, RESOLUTION, SUPERSAMPLE

# The scene colours: the toy VAE reproduces them faithfully (it renders other hues poorly).
PALETTE: dict[str, tuple[int, int, int]] = dict(COLOURS)
GRID = 4
N_TRIGGERS = 200
N_CONCEPTS = N_TRIGGERS


def trigger_word(index: int) -> str:
    """The reserved trigger word number ``index`` (0-based): ``zqaa``, ``zqab``, ..."""
    if not 0 <= index < N_TRIGGERS:
        raise ValueError(f"trigger index must be in [0, {N_TRIGGERS}), got {index}")
    letters = string.ascii_lowercase
    return "zq" + letters[index // 26] + letters[index % 26]


def trigger_words() -> list[str]:
    """All reserved trigger words, in index order (the tokenizer keeps one token for each)."""
    return [trigger_word(i) for i in range(N_TRIGGERS)]


@dataclass(frozen=True)
class ConceptSpec:
    """A concept's fixed identity: glyph cells, second-colour cells, two colours, trigger word."""

    concept_id: int
    trigger: str
    glyph: np.ndarray  # (GRID, GRID) bool: filled cells
    tone: np.ndarray  # (GRID, GRID) bool: filled cells drawn in colour2
    colour1: str
    colour2: str


def _colour_pairs() -> list[tuple[str, str]]:
    """Every ordered pair of distinct palette colours, in a fixed shuffled order (72 for 9 colours)."""
    names = list(PALETTE)
    pairs = [(a, b) for a in names for b in names if a != b]
    random.Random(12345).shuffle(pairs)
    return pairs


def _glyph_shapes() -> list[np.ndarray]:
    """Every mirror-symmetric GRID x GRID glyph that fills its box with 9-14 cells, in a fixed shuffled order."""
    shapes = []
    half_w = (GRID + 1) // 2
    for bits in range(1 << (GRID * half_w)):
        half = np.array([(bits >> i) & 1 for i in range(GRID * half_w)], dtype=bool).reshape(GRID, half_w)
        glyph = np.concatenate([half, half[:, : GRID // 2][:, ::-1]], axis=1)
        if glyph.any(1).all() and glyph.any(0).all() and 9 <= glyph.sum() <= 14:
            shapes.append(glyph)
    order = list(range(len(shapes)))
    random.Random(54321).shuffle(order)
    return [shapes[i] for i in order]


COLOUR_PAIRS = _colour_pairs()
GLYPHS = _glyph_shapes()
# Concepts below this id each have a glyph and a colour pair no other concept of that range has.
N_DISTINCT = min(len(COLOUR_PAIRS), len(GLYPHS))


def _mirrored(rng: np.random.Generator, p: float) -> np.ndarray:
    half = rng.random((GRID, (GRID + 1) // 2)) < p
    return np.concatenate([half, half[:, : GRID // 2][:, ::-1]], axis=1)


def random_tone(glyph: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mirror-symmetric subset of the glyph's cells (2 to all but 4) drawn in the second colour."""
    while True:
        tone = _mirrored(rng, 0.4) & glyph
        if 2 <= tone.sum() <= glyph.sum() - 4:
            return tone


def concept_spec(concept_id: int) -> ConceptSpec:
    """The identity of concept ``concept_id`` (0 <= id < N_CONCEPTS); pure function of the id.

    Ids below ``N_DISTINCT`` get a glyph and an ordered colour pair of their own (no two share either);
    later ids draw both at random.
    """
    if not 0 <= concept_id < N_CONCEPTS:
        raise ValueError(f"concept id must be in [0, {N_CONCEPTS}), got {concept_id}")
    rng = np.random.default_rng(1_000_003 * concept_id + 17)
    if concept_id < N_DISTINCT:
        glyph = GLYPHS[concept_id]
        c1, c2 = COLOUR_PAIRS[concept_id]
    else:
        glyph = GLYPHS[int(rng.integers(len(GLYPHS)))]
        c1, c2 = COLOUR_PAIRS[int(rng.integers(len(COLOUR_PAIRS)))]
    tone = random_tone(glyph, rng)
    return ConceptSpec(concept_id, trigger_word(concept_id), glyph, tone, c1, c2)


def render_concept(
    spec: ConceptSpec,
    center: tuple[float, float],
    size: float,
    background: tuple[int, int, int],
    resolution: int = RESOLUTION,
) -> Image.Image:
    """Draw the glyph with its centre at ``center`` (fractions) and side ``size`` (fraction)."""
    side = resolution * SUPERSAMPLE
    canvas = np.empty((side, side, 3), dtype=np.float32)
    canvas[:] = background
    cell = size * side / GRID
    x0, y0 = center[0] * side - size * side / 2, center[1] * side - size * side / 2
    c1, c2 = np.asarray(PALETTE[spec.colour1]), np.asarray(PALETTE[spec.colour2])
    for r in range(GRID):
        for c in range(GRID):
            if spec.glyph[r, c]:
                ya, yb = round(y0 + r * cell), round(y0 + (r + 1) * cell)
                xa, xb = round(x0 + c * cell), round(x0 + (c + 1) * cell)
                canvas[max(ya, 0) : max(yb, 0), max(xa, 0) : max(xb, 0)] = c2 if spec.tone[r, c] else c1
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def random_view(spec: ConceptSpec, rng: random.Random, named: bool = True) -> tuple[Image.Image, str]:
    """One image of the concept and its caption; ``named`` uses the five named positions."""
    bg_name = rng.choice(list(BACKGROUNDS))
    shade = rng.uniform(-12, 12)
    bg = tuple(int(np.clip(v + shade, 0, 255)) for v in BACKGROUNDS[bg_name])
    size = rng.uniform(0.42, 0.56)
    if named:
        pos = rng.choice(list(POSITIONS))
        fx, fy = POSITIONS[pos]
        center = (fx + rng.uniform(-0.04, 0.04), fy + rng.uniform(-0.04, 0.04))
    else:
        pos = ""
        lo, hi = size / 2 + 0.02, 1 - size / 2 - 0.02
        center = (rng.uniform(lo, hi), rng.uniform(lo, hi))
    img = render_concept(spec, center, size, bg)  # type: ignore[arg-type]
    t = spec.trigger
    where = f" {POSITION_PHRASES[pos]}" if pos else ""
    caption = rng.choice([f"a photo of {t}{where}", f"{t}{where}"])
    if rng.random() < 0.5:
        caption += f", {bg_name} background"
    return img, caption


def concept_examples(concept_id: int, n: int = 8, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """``n`` (5-10 by default use) training images with captions; deterministic for (id, n, seed)."""
    spec = concept_spec(concept_id)
    rng = random.Random(f"{concept_id}:{seed}")
    return [random_view(spec, rng) for _ in range(n)]


def write_concept_folder(concept_id: int, out_dir: str | Path, n: int = 8, seed: int = 0) -> list[Path]:
    """Write ``n`` PNGs with same-name ``.txt`` captions into ``out_dir``; returns the image paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, caption) in enumerate(concept_examples(concept_id, n, seed)):
        path = out / f"{trigger_word(concept_id)}_{i:02d}.png"
        img.save(path)
        path.with_suffix(".txt").write_text(caption + "\n")
        paths.append(path)
    return paths
