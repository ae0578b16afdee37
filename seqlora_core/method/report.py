"""The bank's report: relative interference in both directions, forgetting bounds, capacity per layer.

:func:`build_report` gives the numbers (a JSON-serialisable dict), :func:`report_text` the text every
front end shows. The heatmap picture is drawn in ``seqlora_core.apps.heatmap`` (Pillow stays out of the
method layer).
"""

from __future__ import annotations

import math

import torch

from .bank import ConceptBank
from .interference import bound_of_gram, energy, energy_of_gram, sketch_gram

MAX_TABLE = 40  # concepts shown in the text tables (rows and columns)


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
        "bound_statement": (
            f"with probability >= {1 - delta:g} (union bound over {layer_count} layers at "
            f"{layer_delta:.3g} each) for a Gaussian input with the concept's second moment"
        ),
        "base_drift": [rel(drift[t], t) for t in range(t_count)],
        "mean_relative_interference": mean_offdiag(matrix),
        "mean_relative_interference_on_earlier": _mean_triangle(matrix, lower=True),
        "mean_relative_interference_on_later": _mean_triangle(matrix, lower=False),
        "delta_norm_ratio": {
            c.name: c.info.get("delta_norm_ratio") or _delta_norm_ratio(bank, c) for c in bank.concepts
        },
        "budget": {c.name: c.info["budget"] for c in bank.concepts if "budget" in c.info},
        "protection": protection_summary(bank),
        "tail_unknown": [
            c.name
            for c in bank.concepts
            if any(cl.sketch is not None and not cl.sketch.tail_known for cl in c.layers.values())
        ],
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
            out[c.name] = {
                "layers": len(recs),
                "protected_mean": sum(r["protected"] for r in recs) / len(recs),
                "energy_mean": sum(r["energy"] for r in recs) / len(recs),
                "free_min": min(r["free"] for r in recs),
            }
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


def report_text(rep: dict) -> str:
    """The report as plain text: matrix, bound, drift, budgets, weight change, protection and the layers whose
    capacity ran out."""
    names = rep["concepts"]
    lines = [
        f"{len(names)} concepts; mean relative interference {rep['mean_relative_interference']:.4f} "
        f"(new concepts on earlier ones {rep.get('mean_relative_interference_on_earlier', 0.0):.4f}, "
        f"earlier concepts on new ones {rep.get('mean_relative_interference_on_later', 0.0):.4f})"
    ]
    if names:
        k = min(len(names), MAX_TABLE)
        shown = names[:k]
        w = max(8, *(len(n) for n in shown))
        if k < len(names):
            lines.append(f"the tables show the first {k} of {len(names)} concepts (the JSON report has all)")
        lines.append("R(t->j)/R(t->t), rows t, columns j:")
        lines.append(" " * (w + 1) + " ".join(f"{j:>8d}" for j in range(k)))
        for t, row in enumerate(rep["interference"][:k]):
            lines.append(f"{names[t]:<{w}} " + " ".join(f"{v:8.4f}" for v in row[:k]))
        lines.append(f"forgetting bound, relative, summed over layers: {rep['bound_statement']}:")
        for t, row in enumerate(rep["bound"][:k]):
            lines.append(f"{names[t]:<{w}} " + " ".join(f"{v:8.4f}" for v in row[:k]))
        drift = zip(shown, rep["base_drift"][:k], strict=True)
        lines.append("base drift: " + ", ".join(f"{n} {d:.4f}" for n, d in drift))
    for name, budget in rep.get("budget", {}).items():
        if not budget["met"]:
            lines.append(
                f"{name}: interference budget missed, {budget['achieved']:.3g} against {budget['budget']:.3g} "
                f"({budget['layers_over']} of {budget['layers']} layers over it)"
            )
    ratios = {n: r for n, r in rep.get("delta_norm_ratio", {}).items() if r}
    if ratios:
        lines.append(
            "||dW|| / ||W|| (mean over layers): " + ", ".join(f"{n} {r['mean']:.3f}" for n, r in ratios.items())
        )
    for name, p in rep.get("protection", {}).items():
        lines.append(
            f"{name}: protected {p['protected_mean']:.0f} input directions per layer on average "
            f"({p['energy_mean']:.1%} of the earlier activations' energy), at least {p['free_min']} left free"
        )
    if rep.get("tail_unknown"):
        lines.append("no recorded trace (tail unknown) for: " + ", ".join(rep["tail_unknown"]))
    soft = {k: v for k, v in rep["capacity"].items() if v["soft"]}
    used = max((v["used"] / max(v["total"], 1) for v in rep["capacity"].values()), default=0.0)
    lines.append(f"capacity: fullest layer {used:.0%} used")
    if soft:
        first = next(iter(soft))
        lines.append(
            f"{len(soft)} layers ran out of room (orthogonality is a penalty there), e.g. {first}: "
            f"{', '.join(soft[first]['soft'])}"
        )
    return "\n".join(lines)


def bound_exceedance(bank: ConceptBank, rows: dict[str, dict[str, torch.Tensor]], delta: float = 0.05) -> dict:
    """How the per-layer forgetting bound at ``delta`` fares on real activations.

    ``rows[j][layer]``: held-out input rows of concept j at that layer. For every layer and ordered pair
    (t, j), t != j, the share of j's rows x with ||dW_t x||^2 above the bound of R(t->j) is its exceedance
    rate; a bound that means what it says has a rate <= delta. Returns the share of (layer, pair) cases
    within delta, the median and 90th percentile rate, and the case count."""
    rates = []
    for j, cj in enumerate(bank.concepts):
        if cj.name not in rows:
            continue
        for spec in bank.layers:
            x = rows[cj.name].get(spec.name)
            sk = cj.layers[spec.name].sketch
            if x is None or x.numel() == 0 or sk is None:
                continue
            x = x.double()
            for t, ct in enumerate(bank.concepts):
                if t == j:
                    continue
                cl = ct.layers[spec.name]
                q = ((x @ cl.A.double().T) @ cl.B.double().T).pow(2).sum(1)
                limit = bound_of_gram(cl.B, sketch_gram(cl.A, sk, "max"), delta)
                rates.append(float((q > limit).double().mean()))
    if not rates:
        return {"cases": 0, "within_delta": None, "median_rate": None, "p90_rate": None, "delta": delta}
    ordered = sorted(rates)
    return {
        "cases": len(rates),
        "within_delta": sum(r <= delta for r in rates) / len(rates),
        "median_rate": ordered[len(ordered) // 2],
        "p90_rate": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "delta": delta,
    }
