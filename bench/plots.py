"""Line charts for the bench results, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "seqlora": (200, 30, 30),
    "lora": (60, 60, 200),
    "sequential": (240, 150, 0),
    "ortho_frozen": (30, 150, 60),
    "joint": (150, 60, 170),
    "fusion": (90, 90, 90),
    "seqlora_v1": (240, 120, 120),
    "frozen_a": (120, 40, 40),
}
Point = tuple[float, float, float]  # x, y, error bar half-height


def line_chart(
    series: dict[str, list[Point]], title: str, xlabel: str, ylabel: str, path: Path, size: tuple[int, int] = (560, 360)
) -> Path:
    """One line per series with error bars, axes with a few ticks, a legend; written as PNG."""
    font = ImageFont.load_default()
    w, h = size
    left, right, top, bottom = 60, 130, 30, 45
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    xs = sorted({p[0] for p in pts})
    y_lo = min(0.0, min(p[1] - p[2] for p in pts))
    y_hi = max(p[1] + p[2] for p in pts) or 1.0
    y_hi += 0.05 * (y_hi - y_lo)

    def px(x: float) -> float:
        i = xs.index(x)  # categorical x: evenly spaced
        return left + (i + 0.5) * (w - left - right) / len(xs)

    def py(y: float) -> float:
        return h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom)

    d.rectangle((left, top, w - right, h - bottom), outline="black")
    for k in range(5):
        y = y_lo + k * (y_hi - y_lo) / 4
        d.line((left - 4, py(y), left, py(y)), fill="black")
        d.text((4, py(y) - 6), f"{y:.3g}", fill="black", font=font)
    for x in xs:
        d.line((px(x), h - bottom, px(x), h - bottom + 4), fill="black")
        d.text((px(x) - 8, h - bottom + 6), f"{x:g}", fill="black", font=font)
    d.text((w // 2 - 60, 8), title, fill="black", font=font)
    d.text(((w - right) // 2, h - 18), xlabel, fill="black", font=font)
    d.text((4, top - 20), ylabel, fill="black", font=font)
    for i, (name, s) in enumerate(series.items()):
        colour = COLOURS.get(name) or tuple(c // 2 for c in COLOURS.get(name.split(",")[0], (0, 0, 0)))
        s = sorted(s)
        d.line([(px(x), py(y)) for x, y, _ in s], fill=colour, width=2)
        for x, y, e in s:
            d.ellipse((px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3), fill=colour)
            if e:
                d.line((px(x), py(y - e), px(x), py(y + e)), fill=colour)
        ly = top + 14 * i
        d.line((w - right + 8, ly + 6, w - right + 24, ly + 6), fill=colour, width=3)
        d.text((w - right + 28, ly), name, fill="black", font=font)
    img.save(path)
    return path


def plot_quality(summary: list[dict], prefix: Path) -> list[Path]:
    """Final identity, average forgetting and interference against N, one line per method; runs at a rank
    other than the usual one get lines of their own ("seqlora, rank 2", a darker shade)."""
    out = []
    ranks = [s.get("rank") for s in summary]
    usual = max(set(ranks), key=ranks.count) if ranks else None
    for key, label in (
        ("mean_identity_alone", "identity, each concept alone"),
        ("final_identity", "identity, all concepts composed"),
        ("average_forgetting", "average forgetting"),
        ("prior_drift_pixels", "prior drift (trigger-free prompts)"),
        ("interference_on_earlier", "interference of new concepts on earlier ones"),
    ):
        series: dict[str, list[Point]] = {}
        for s in summary:
            if s.get(key) is not None:
                name = s["method"] if s.get("rank") == usual else f"{s['method']}, rank {s['rank']}"
                series.setdefault(name, []).append((s["n"], s[key], s[key + "_std"]))
        if series:
            out.append(line_chart(series, label, "concepts N", label, Path(f"{prefix}_{key}.png")))
    return out
