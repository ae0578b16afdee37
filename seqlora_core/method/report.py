"""The bank's report: relative interference in both directions, forgetting bounds, capacity per layer.

:func:`build_report` gives the numbers (a JSON-serialisable dict), :func:`report_text` the text every
front end shows. The heatmap picture is drawn in ``seqlora_core.apps.heatmap`` (Pillow stays out of the
method layer).
"""

from __future__ import annotations

import math

import torch

from .bank import ConceptBank
from .interference import energy, forgetting_bound
from .stats import Sketch


def _factor(sk: Sketch | None) -> torch.Tensor | None:
    return None if sk is None else sk.factor.double()


def build_report(bank: ConceptBank, delta: float = 0.05, per_layer: bool = False) -> dict:
    """JSON-serialisable report.

    ``interference[t][j]`` = sum_l R_l(t->j) / sum_l R_l(t->t): the energy concept t's adapter adds while
    concept j is generated, relative to its energy on its own concept (diagonal 1). ``base_drift[t]`` is
    the same against the base model's trigger-free statistics (concept 0). ``bound[t][j]`` is the
    Laurent-Massart bound at probability 1 - delta, summed over layers, relative likewise.
    """
    names = bank.names()
    t_count = len(names)
    raw = [[0.0] * t_count for _ in range(t_count)]
    bnd = [[0.0] * t_count for _ in range(t_count)]
    drift = [0.0] * t_count
    layer_rows: dict[str, list[list[float]]] = {}
    for spec in bank.layers:
        factors = [_factor(c.layers[spec.name].sketch) for c in bank.concepts]
        prior = _factor(bank.prior.get(spec.name))
        lr = [[0.0] * t_count for _ in range(t_count)]
        for t, ct in enumerate(bank.concepts):
            cl = ct.layers[spec.name]
            a, b = cl.A.double(), cl.B.double()
            for j in range(t_count):
                f = factors[j]
                if f is None:
                    continue
                e = float(energy(b, a, f))
                raw[t][j] += e
                lr[t][j] = e
                bnd[t][j] += forgetting_bound(b, a, f, delta)
            if prior is not None:
                drift[t] += float(energy(b, a, prior))
        if per_layer:
            layer_rows[spec.name] = lr
    self_e = [raw[t][t] for t in range(t_count)]

    def rel(x: float, t: int) -> float:
        return x / self_e[t] if self_e[t] > 0 else (0.0 if x == 0 else math.inf)

    report = {
        "concepts": names,
        "triggers": {c.name: c.triggers for c in bank.concepts},
        "methods": {c.name: c.method for c in bank.concepts},
        "interference": [[rel(raw[t][j], t) for j in range(t_count)] for t in range(t_count)],
        "interference_raw": raw,
        "bound": [[rel(bnd[t][j], t) for j in range(t_count)] for t in range(t_count)],
        "bound_raw": bnd,
        "bound_delta": delta,
        "base_drift": [rel(drift[t], t) for t in range(t_count)],
        "mean_relative_interference": mean_offdiag(
            [[rel(raw[t][j], t) for j in range(t_count)] for t in range(t_count)]
        ),
        "capacity": capacity(bank),
        "fingerprint": bank.fingerprint,
    }
    if per_layer:
        report["per_layer_raw"] = layer_rows
    return report


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
    """The report as plain text: matrix, bound, drift and the layers whose capacity ran out."""
    names = rep["concepts"]
    lines = [f"{len(names)} concepts; mean relative interference {rep['mean_relative_interference']:.4f}"]
    if names:
        w = max(8, *(len(n) for n in names))
        lines.append("R(t->j)/R(t->t), rows t, columns j:")
        lines.append(" " * (w + 1) + " ".join(f"{j:>8d}" for j in range(len(names))))
        for t, row in enumerate(rep["interference"]):
            lines.append(f"{names[t]:<{w}} " + " ".join(f"{v:8.4f}" for v in row))
        lines.append(f"forgetting bound (p >= {1 - rep['bound_delta']:.2f}), relative:")
        for t, row in enumerate(rep["bound"]):
            lines.append(f"{names[t]:<{w}} " + " ".join(f"{v:8.4f}" for v in row))
        lines.append("base drift: " + ", ".join(f"{n} {d:.4f}" for n, d in zip(names, rep["base_drift"], strict=True)))
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
