"""Small synthetic images for dataset and backend tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A seeded random RGB image converted to `mode`."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert(mode)


def save(img: Image.Image, path: Path, caption: str | None = None, **kwargs) -> Path:
    """Save `img` (creating folders) and, when given, a same-name `.txt` caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def concept_folder(root: Path, sizes: list[tuple[int, int]], captions: list[str | None] | None = None) -> Path:
    """A folder of seeded noise PNGs of the given (w, h) sizes, with optional captions."""
    captions = captions or [None] * len(sizes)
    for i, ((w, h), cap) in enumerate(zip(sizes, captions, strict=True)):
        save(noise_image(w, h, seed=i), root / f"img{i}.png", cap)
    return root


def make_images(folder: Path, seed: int, n: int = 4) -> Path:
    """A few small coloured-shape images of one 'concept' (sizes vary, one caption file)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (64 + 8 * i, 64), (40 * seed % 255, 90 + 10 * i, 200 - 30 * seed))
        d = ImageDraw.Draw(im)
        d.ellipse([8 + 3 * i, 8, 40 + 4 * seed, 44], fill=(250, 60 * seed % 255, 20))
        im.save(folder / f"{i}.png")
    (folder / "0.txt").write_text("a photo of the thing on a table")
    return folder
