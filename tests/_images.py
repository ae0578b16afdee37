"""Small synthetic images for dataset and backend tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


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
