"""The report's interference matrix as a PNG heatmap (Pillow), for the command line, the demo and ComfyUI."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

MAX_SIDE = 2000  # pixels of the matrix, whatever the number of concepts


def _colour(v: float, vmax: float) -> tuple[int, int, int]:
    """White (0) -> orange -> dark red (vmax), on a sqrt scale; grey for a value that is not a number."""
    if math.isnan(v) or math.isnan(vmax):
        return (160, 160, 160)
    x = 0.0 if vmax <= 0 else min(max(v / vmax, 0.0), 1.0) ** 0.5
    stops = [(255, 255, 255), (253, 174, 97), (215, 48, 39), (103, 0, 13)]
    pos = x * (len(stops) - 1)
    i = min(int(pos), len(stops) - 2)
    f = pos - i
    return tuple(int(stops[i][k] + f * (stops[i + 1][k] - stops[i][k])) for k in range(3))


def heatmap_image(report: dict, cell: int = 36, title: str = "relative interference R(t->j)/R(t->t)") -> Image.Image:
    """The off-diagonal relative interference as a PNG-ready image (rows t, columns j; diagonal grey).

    Cells shrink so the matrix stays within ``MAX_SIDE`` pixels; below 24 pixels they carry no numbers,
    below 12 the rows no names."""
    names = report["concepts"]
    mat = report["interference"]
    n = len(names)
    cell = max(1, min(cell, MAX_SIDE // max(n, 1)))
    font = ImageFont.load_default()
    label_w = max([60] + [int(font.getlength(f"{i} {x[:16]}")) + 10 for i, x in enumerate(names) if cell >= 12])
    top = 40 + label_w // 2
    w = label_w + max(n, 1) * cell + 80
    h = top + max(n, 1) * cell + 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((6, 6), title, fill="black", font=font)
    d.text((6, 20), f"mean off-diagonal {report['mean_relative_interference']:.4f}", fill="black", font=font)
    offd = [mat[t][j] for t in range(n) for j in range(n) if t != j and math.isfinite(mat[t][j])]
    vmax = max(offd) if offd else 1.0
    for t in range(n):
        if cell >= 12:
            d.text((4, top + t * cell + cell // 3), f"{t} {names[t][:16]}", fill="black", font=font)
        for j in range(n):
            x0, y0 = label_w + j * cell, top + t * cell
            v = mat[t][j]
            fill = (200, 200, 200) if t == j else _colour(v, vmax)
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=fill, outline=(230, 230, 230))
            if t != j and math.isfinite(v) and cell >= 24:
                txt = f"{v:.2f}" if v < 10 else f"{v:.0f}"
                d.text((x0 + 3, y0 + cell // 3), txt, fill="black" if _colour(v, vmax)[1] > 100 else "white", font=font)
    for j in range(n) if cell >= 12 else ():
        d.text((label_w + j * cell + 3, top - 14), str(j), fill="black", font=font)
    # colour bar
    bx = label_w + n * cell + 20
    for k in range(n * cell):
        d.line([bx, top + k, bx + 12, top + k], fill=_colour(vmax * (1 - k / max(n * cell, 1)), vmax))
    d.text((bx + 16, top), f"{vmax:.2f}", fill="black", font=font)
    d.text((bx + 16, top + n * cell - 10), "0", fill="black", font=font)
    return img


def write_heatmap_png(report: dict, path: str | Path) -> Path:
    """Save :func:`heatmap_image` as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_image(report).save(path)
    return path
