"""The ``fusion`` baseline: Mix-of-Show-style least-squares fusion of independently trained LoRAs.

Per layer, W* = argmin_W sum_j E_{x~j} ||W x - (W0 + s_j dW_j) x||^2 + eps ||W - W0||^2, in closed form

    W* = (sum_j (W0 + s_j dW_j) S_j + eps W0) (sum_j S_j + eps I)^-1
    W* - W0 = (sum_j s_j dW_j S_j) (sum_j S_j + eps I)^-1

The small ridge pulls unseen directions to the base weight (not to zero, which would break the base model).
It needs each concept's full n x n input moment S_j at every layer: that memory and the solve are the cost
this baseline pays and SeqLoRA does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..method.bank import ConceptBank


def fused_delta(deltas: list[torch.Tensor], moments: list[torch.Tensor], ridge: float = 1e-3) -> torch.Tensor:
    """W* - W0 for one layer, given each concept's (strength-scaled) dW_j and input moment S_j."""
    total = sum(m.double() for m in moments)
    n = total.shape[0]
    eps = ridge * float(torch.trace(total)) / n + 1e-12
    rhs = sum(d.double() @ m.double() for d, m in zip(deltas, moments, strict=True))
    lhs = total + eps * torch.eye(n, dtype=torch.float64, device=total.device)
    # X lhs = rhs  <=>  lhs^T X^T = rhs^T (lhs is symmetric)
    return torch.linalg.solve(lhs, rhs.T).T.float()


def fused_deltas(bank: ConceptBank, strengths: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Fused weight changes for every bank layer; needs each concept's stored moment (or its sketch)."""
    out = {}
    chosen = [(bank.concept(n), s) for n, s in strengths.items() if s != 0]
    for spec in bank.layers:
        deltas, moments = [], []
        for c, s in chosen:
            cl = c.layers[spec.name]
            if cl.moment is not None:
                m = cl.moment
            elif cl.sketch is not None:
                m = cl.sketch.dense()
            else:
                raise ValueError(f"concept {c.name!r} has no activation statistics at {spec.name!r}; cannot fuse")
            deltas.append(c.delta(spec.name) * s)
            moments.append(m)
        if deltas:
            out[spec.name] = fused_delta(deltas, moments)
    return out
