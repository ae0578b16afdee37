"""Deterministic procedural scenes of simple coloured shapes, with their prompts.

A scene is one or two objects (shape, colour, optional second-colour pattern and size) at a named
position on a plain background. Images are drawn 4x larger and downsampled, so edges are smooth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 30),
    "purple": (150, 60, 200),
    "orange": (250, 135, 20),
    "cyan": (30, 200, 210),
    "pink": (245, 120, 185),
    "brown": (135, 75, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "gray": (120, 120, 120),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
POSITIONS: dict[str, tuple[float, float]] = {  # object centre as a fraction of the image side (x, y)
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
SIZES: dict[str, float] = {"small": 0.28, "big": 0.46}  # object side as a fraction of the image side
DEFAULT_SIZE = 0.37
PATTERNS = ("striped", "checkered")
PAIRS = (("left", "right"), ("top", "bottom"))

# (colour, shape) pairs never shown in pretraining: the prompt-following check uses them.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "ring"),
        ("blue", "diamond"),
        ("yellow", "cross"),
        ("purple", "square"),
        ("orange", "circle"),
    }
)


@dataclass(frozen=True)
class SceneObject:
    """One object: its shape, colour, position name, and optional size word and pattern."""

    shape: str
    colour: str
    position: str
    size: str | None = None
    pattern: str | None = None
    colour2: str | None = None


@dataclass(frozen=True)
class Scene:
    """A background and one or two objects."""

    objects: tuple[SceneObject, ...]
    background: str
    say_background: bool = False
    template: int = 0


def object_phrase(obj: SceneObject) -> str:
    """Noun phrase without article, e.g. ``small red and blue striped circle``."""
    words = [obj.size] if obj.size else []
    if obj.pattern:
        words += [obj.colour, "and", obj.colour2 or obj.colour, obj.pattern]
    else:
        words.append(obj.colour)
    words.append(obj.shape)
    return " ".join(words)


def scene_prompt(scene: Scene) -> str:
    """The caption of a scene; templates vary the wording around the same content."""
    parts = [f"a {object_phrase(o)} {POSITION_PHRASES[o.position]}" for o in scene.objects]
    text = " and ".join(parts)
    if scene.template == 1:
        text = "a photo of " + text
    elif scene.template == 2:
        text = text[2:]  # no article
    if scene.say_background:
        text += f", {scene.background} background"
    return text


def shape_polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape, or None for round ones."""
    if shape == "square":
        h = half * 0.88
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    if shape == "cross":
        t = half * 0.36
        return [
            (cx - t, cy - half),
            (cx + t, cy - half),
            (cx + t, cy - t),
            (cx + half, cy - t),
            (cx + half, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + half),
            (cx - t, cy + half),
            (cx - t, cy + t),
            (cx - half, cy + t),
            (cx - half, cy - t),
            (cx - t, cy - t),
        ]
    return None


def shape_mask(shape: str, cx: float, cy: float, half: float, side: int) -> Image.Image:
    """A binary ("L") mask of one shape on a ``side`` x ``side`` canvas."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    poly = shape_polygon(shape, cx, cy, half)
    if poly is not None:
        draw.polygon(poly, fill=255)
    elif shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=255)
        inner = half * 0.55
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def pattern_layer(pattern: str, side: int, period: float) -> np.ndarray:
    """A {0,1} map of the second colour for a pattern."""
    yy, xx = np.mgrid[0:side, 0:side]
    if pattern == "striped":
        return ((yy // period) % 2).astype(bool)
    if pattern == "checkered":
        return (((yy // period) + (xx // period)) % 2).astype(bool)
    raise ValueError(f"unknown pattern {pattern!r}")


def paint(
    canvas: np.ndarray,
    mask: Image.Image,
    rgb: tuple[int, int, int],
    second: tuple[int, int, int] | None = None,
    where2: np.ndarray | None = None,
) -> None:
    """Fill ``mask`` on the float canvas with one colour, or two following ``where2``."""
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    fill = np.empty_like(canvas)
    fill[:] = np.asarray(rgb, dtype=np.float32)
    if second is not None and where2 is not None:
        fill[where2] = np.asarray(second, dtype=np.float32)
    canvas *= 1.0 - m
    canvas += m * fill


def render_scene(scene: Scene, seed: int = 0, resolution: int = RESOLUTION) -> Image.Image:
    """Draw a scene; ``seed`` sets the small position/size jitter and background shade."""
    rng = random.Random(seed)
    side = resolution * SUPERSAMPLE
    shade = rng.uniform(-12, 12)
    bg = np.clip(np.asarray(BACKGROUNDS[scene.background], dtype=np.float32) + shade, 0, 255)
    canvas = np.empty((side, side, 3), dtype=np.float32)
    canvas[:] = bg
    many = len(scene.objects) > 1
    for obj in scene.objects:
        fx, fy = POSITIONS[obj.position]
        if many:  # two objects sit further out so they never overlap
            fx, fy = 0.5 + (fx - 0.5) * 1.12, 0.5 + (fy - 0.5) * 1.12
        frac = SIZES.get(obj.size or "", DEFAULT_SIZE) * (0.8 if many else 1.0)
        frac *= rng.uniform(0.92, 1.08)
        cx = (fx + rng.uniform(-0.04, 0.04)) * side
        cy = (fy + rng.uniform(-0.04, 0.04)) * side
        mask = shape_mask(obj.shape, cx, cy, frac * side / 2, side)
        where2 = None
        if obj.pattern:
            where2 = pattern_layer(obj.pattern, side, period=max(2.0, round(frac * side / 4)))
        second = COLOURS[obj.colour2] if obj.colour2 else None
        paint(canvas, mask, COLOURS[obj.colour], second, where2)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def random_object(rng: random.Random, position: str, allow_held_out: bool, two: bool) -> SceneObject:
    """Sample one object; held-out (colour, shape) pairs are skipped unless allowed."""
    while True:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if allow_held_out or (colour, shape) not in HELD_OUT:
            break
    size = None if two else rng.choice([None, None, "small", "big"])
    pattern = colour2 = None
    if rng.random() < 0.15:
        pattern = rng.choice(PATTERNS)
        colour2 = rng.choice([c for c in COLOURS if c != colour])
    return SceneObject(shape, colour, position, size, pattern, colour2)


def random_scene(rng: random.Random, allow_held_out: bool = False, p_two: float = 0.2) -> Scene:
    """Sample a scene: one object at a named position, or two at opposite positions."""
    if rng.random() < p_two:
        pair = rng.choice(PAIRS)
        if rng.random() < 0.5:
            pair = pair[::-1]
        objects = tuple(random_object(rng, p, allow_held_out, True) for p in pair)
    else:
        objects = (random_object(rng, rng.choice(list(POSITIONS)), allow_held_out, False),)
    return Scene(objects, rng.choice(list(BACKGROUNDS)), rng.random() < 0.5, rng.randrange(3))


def scene_dataset(
    n: int, seed: int = 0, allow_held_out: bool = False, resolution: int = RESOLUTION
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` random scenes: uint8 images (n, H, W, 3), prompts, and the scene specs."""
    rng = random.Random(seed)
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    prompts, scenes = [], []
    for i in range(n):
        scene = random_scene(rng, allow_held_out)
        images[i] = np.asarray(render_scene(scene, seed=rng.randrange(1 << 30), resolution=resolution))
        prompts.append(scene_prompt(scene))
        scenes.append(scene)
    return images, prompts, scenes


def vocabulary() -> list[str]:
    """Every word a scene prompt can use."""
    words = {"a", "photo", "of", "and", "on", "the", "at", "in", "background", ","}
    words |= set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) | set(SIZES) | set(PATTERNS)
    for phrase in POSITION_PHRASES.values():
        words |= set(phrase.split())
    return sorted(words)
