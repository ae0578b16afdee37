"""The bank's report: relative interference in both directions, forgetting bounds, capacity per layer."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .bank import ConceptBank
from .interference import bound_of_gram, energy, energy_of_gram, sketch_gram


def build_report(bank: ConceptBank, delta: float = 0.05, per_layer: bool = False) -> dict:
    """JSON-serialisable report.

    ``interference[t][j]`` = sum_l R_l(t->j) / sum_l R_l(t->t): the energy concept t's adapter adds while
    concept j is generated, relative to its energy on its own concept (diagonal 1). Where concept j was
    trained after t, the bank holds R(t->j) measured exactly on j's activations at its training; otherwise it
    comes from j's activation sketch with its tail. ``base_drift[t]`` is the same against the base model's
    trigger-free statistics (concept 0). ``bound[t][j]``: with probability at least 1 - delta, for an input
    of concept j every layer's ||dW_t x||^2 stays below its Laurent-Massart bound at delta / L (a union bound
    over the L layers), and ``bound`` is the sum of those L bounds relative to R(t->t); ``bound_layer_delta``
    is the per-layer probability. Sketches model the left-out energy (their tail); concepts without a
    recorded trace are listed in ``tail_unknown``.
    """
    names = bank.names()
    t_count = len(names)
    layer_count = max(len(bank.layers), 1)
    layer_delta = delta / layer_count
    raw = [[0.0] * t_count for _ in range(t_count)]
    bnd = [[0.0] * t_count for _ in range(t_count)]
    drift = [0.0] * t_count
    layer_rows: dict[str, list[list[float]]] = {}
    for spec in bank.layers:
        sketches = [c.layers[spec.name].sketch for c in bank.concepts]
        prior = bank.prior.get(spec.name)
        lr = [[0.0] * t_count for _ in range(t_count)]
        for t, ct in enumerate(bank.concepts):
            cl = ct.layers[spec.name]
            for j in range(t_count):
                sk = sketches[j]
                if sk is None:
                    continue
                k = sketch_gram(cl.A, sk, "mean")
                e = energy_of_gram(cl.B, k)
                raw[t][j] += e
                lr[t][j] = e
                bnd[t][j] += bound_of_gram(cl.B, sketch_gram(cl.A, sk, "max"), layer_delta)
            if prior is not None:
                drift[t] += energy(cl.B, cl.A, prior, "mean")
        if per_layer:
            layer_rows[spec.name] = lr
    exact = _exact_entries(bank)
    for (t, j), value in exact.items():
        raw[t][j] = value
    self_e = [raw[t][t] for t in range(t_count)]

    def rel(x: float, t: int) -> float:
        return x / self_e[t] if self_e[t] > 0 else (0.0 if x == 0 else math.inf)

    matrix = [[rel(raw[t][j], t) for j in range(t_count)] for t in range(t_count)]
    report = {
        "concepts": names,
        "triggers": {c.name: c.triggers for c in bank.concepts},
        "methods": {c.name: c.method for c in bank.concepts},
        "interference": matrix,
        "interference_raw": raw,
        "interference_exact": [[(t, j) in exact for j in range(t_count)] for t in range(t_count)],
        "bound": [[rel(bnd[t][j], t) for j in range(t_count)] for t in range(t_count)],
        "bound_raw": bnd,
        "bound_delta": delta,
        "bound_layer_delta": layer_delta,
        "bound_statement": (f"with probability >= {1 - delta:g} (union bound over {layer_count} layers at "
                            f"{layer_delta:.3g} each) for a Gaussian input with the concept's second moment"),
        "base_drift": [rel(drift[t], t) for t in range(t_count)],
        "mean_relative_interference": mean_offdiag(matrix),
        "mean_relative_interference_on_earlier": _mean_triangle(matrix, lower=True),
        "mean_relative_interference_on_later": _mean_triangle(matrix, lower=False),
        "delta_norm_ratio": {c.name: c.info.get("delta_norm_ratio") or _delta_norm_ratio(bank, c)
                             for c in bank.concepts},
        "budget": {c.name: c.info["budget"] for c in bank.concepts if "budget" in c.info},
        "protection": protection_summary(bank),
        "tail_unknown": [c.name for c in bank.concepts
                         if any(cl.sketch is not None and not cl.sketch.tail_known for cl in c.layers.values())],
        "capacity": capacity(bank),
        "fingerprint": bank.fingerprint,
    }
    if per_layer:
        report["per_layer_raw"] = layer_rows
    return report


def _exact_entries(bank: ConceptBank) -> dict[tuple[int, int], float]:
    """R(t->j) measured on j's own activations at its training (t < j), and R(j->j), where the bank has them."""
    index = {n: i for i, n in enumerate(bank.names())}
    out = {}
    for j, c in enumerate(bank.concepts):
        if "self_energy" in c.info:
            out[(j, j)] = float(c.info["self_energy"])
        for name, value in (c.info.get("received_interference") or {}).items():
            if name in index and index[name] < j:
                out[(index[name], j)] = float(value)
    return out


def _mean_triangle(matrix: list[list[float]], lower: bool) -> float:
    """Mean of R(t->j)/R(t->t) over pairs with t later than j (``lower``: a new concept on earlier ones) or
    earlier than j (earlier concepts on a new one)."""
    vals = [v for t, row in enumerate(matrix) for j, v in enumerate(row) if (t > j if lower else t < j)]
    return sum(vals) / len(vals) if vals else 0.0


def _delta_norm_ratio(bank: ConceptBank, concept) -> dict | None:
    """||dW||_F / ||W||_F over the concept's layers (mean, max), where the bank knows the base weights' norms."""
    norms = bank.meta.get("weight_norms") or {}
    ratios = [float(concept.delta(n).norm()) / norms[n] for n in concept.layers if norms.get(n)]
    return {"mean": sum(ratios) / len(ratios), "max": max(ratios)} if ratios else None


def protection_summary(bank: ConceptBank) -> dict[str, dict]:
    """Per concept: mean protected directions, mean protected energy fraction and fewest free directions."""
    out = {}
    for c in bank.concepts:
        recs = [cl.protection for cl in c.layers.values() if cl.protection]
        if recs:
            out[c.name] = {"layers": len(recs),
                           "protected_mean": sum(r["protected"] for r in recs) / len(recs),
                           "energy_mean": sum(r["energy"] for r in recs) / len(recs),
                           "free_min": min(r["free"] for r in recs)}
    return out


def mean_offdiag(matrix: list[list[float]]) -> float:
    """Mean of the off-diagonal entries (0 for fewer than two concepts)."""
    vals = [v for t, row in enumerate(matrix) for j, v in enumerate(row) if t != j]
    return sum(vals) / len(vals) if vals else 0.0


def capacity(bank: ConceptBank) -> dict[str, dict]:
    """Per layer: rank used by hard-orthogonal concepts, total n, and the concepts that ran out of room."""
    out = {}
    for spec in bank.layers:
        used = sum(c.rank for c in bank.concepts if not c.layers[spec.name].soft)
        soft = [c.name for c in bank.concepts if c.layers[spec.name].soft]
        out[spec.name] = {"used": used, "total": spec.in_features, "soft": soft}
    return out


def _colour(v: float, vmax: float) -> tuple[int, int, int]:
    """White (0) -> orange -> dark red (vmax), on a sqrt scale."""
    x = 0.0 if vmax <= 0 else min(max(v / vmax, 0.0), 1.0) ** 0.5
    stops = [(255, 255, 255), (253, 174, 97), (215, 48, 39), (103, 0, 13)]
    pos = x * (len(stops) - 1)
    i = min(int(pos), len(stops) - 2)
    f = pos - i
    return tuple(int(stops[i][k] + f * (stops[i + 1][k] - stops[i][k])) for k in range(3))


def heatmap_image(report: dict, cell: int = 36, title: str = "relative interference R(t->j)/R(t->t)") -> Image.Image:
    """The off-diagonal relative interference as a PNG-ready image (rows t, columns j; diagonal grey)."""
    names = report["concepts"]
    mat = report["interference"]
    n = len(names)
    font = ImageFont.load_default()
    label_w = max([60] + [int(font.getlength(f"{i} {x[:16]}")) + 10 for i, x in enumerate(names)])
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
        d.text((4, top + t * cell + cell // 3), f"{t} {names[t][:16]}", fill="black", font=font)
        for j in range(n):
            x0, y0 = label_w + j * cell, top + t * cell
            v = mat[t][j]
            fill = (200, 200, 200) if t == j else _colour(v, vmax)
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=fill, outline=(230, 230, 230))
            if t != j and math.isfinite(v):
                txt = f"{v:.2f}" if v < 10 else f"{v:.0f}"
                d.text((x0 + 3, y0 + cell // 3), txt, fill="black" if _colour(v, vmax)[1] > 100 else "white",
                       font=font)
    for j in range(n):
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
