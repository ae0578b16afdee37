"""Learned LoRA bases on the Stiefel manifold, kept orthogonal to earlier concepts' bases."""

from __future__ import annotations

import math

import torch


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` (..., r, n) orthonormalised by QR, with a sign convention that makes it deterministic."""
    q, r = torch.linalg.qr(a.mT.double())
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs.unsqueeze(-2)).mT.to(a.dtype).contiguous()


def span_basis(rows: list[torch.Tensor], n: int, tol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis (n x K) of the span of all rows given (earlier concepts' A_j)."""
    if not rows:
        return torch.zeros(n, 0)
    stacked = torch.cat([r.double() for r in rows], 0)
    u, s, _ = torch.linalg.svd(stacked.T, full_matrices=False)
    keep = s > tol * max(float(s.max()), 1e-30)
    return u[:, keep].float().contiguous()


def project_out(g: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """G P with P = I - Q Q^T: remove the components of G's rows along earlier bases (batched)."""
    if q is None or q.shape[-1] == 0:
        return g
    return g - (g @ q) @ q.mT


def stiefel_tangent(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Project a Euclidean gradient G onto the tangent space of {A : A A^T = I} at A."""
    x = g @ a.mT
    return g - 0.5 * (x + x.mT) @ a


def retract(a: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """Back onto the feasible set: re-project on the complement of Q, then QR."""
    return orthonormal_rows(project_out(a, q))


def generalized_eigen_basis(
    f_new: torch.Tensor,
    s_old: torch.Tensor,
    r: int,
    q_prev: torch.Tensor | None = None,
    delta_scale: float = 1e-2,
) -> torch.Tensor:
    """Top-r directions maximising a^T S_new a / a^T (S_old + delta I) a within the complement of Q.

    ``S_new = F F^T`` is given by its sketch factor F (n x k); ``delta = delta_scale * tr(S_old) / n``.
    With L L^T = S_old + delta I (in complement coordinates) the pencil's top eigenvectors are
    L^-T u, u the top left singular vectors of L^-1 F: one Cholesky, no n x n eigendecomposition.
    Returns A (r x n) with orthonormal rows, orthogonal to Q.
    """
    n = s_old.shape[0]
    f = f_new.double()
    s_old = s_old.double()
    delta = delta_scale * float(torch.trace(s_old)) / n
    if delta <= 0:
        delta = delta_scale * max(float(f.pow(2).sum()) / n, 1e-12)
    z = None
    if q_prev is not None and q_prev.shape[1] > 0:
        # Z: orthonormal basis of the complement of span(Q) (the trailing columns of a complete QR)
        k = q_prev.shape[1]
        full, _ = torch.linalg.qr(q_prev.double(), mode="complete")
        z = full[:, k:]
        if z.shape[1] < r:
            raise ValueError(f"only {z.shape[1]} free directions left, rank {r} needs {r}")
        f = z.T @ f
        s_old = z.T @ s_old @ z
    eye = torch.eye(s_old.shape[0], dtype=torch.float64, device=s_old.device)
    chol = torch.linalg.cholesky((s_old + s_old.T) / 2 + delta * eye)
    g = torch.linalg.solve_triangular(chol, f, upper=False)
    u = torch.linalg.svd(g, full_matrices=False)[0]
    if u.shape[1] < r:  # the concept spans fewer than r directions: complete with seeded ones
        extra = torch.randn(u.shape[0], r - u.shape[1], generator=torch.Generator().manual_seed(r), dtype=u.dtype)
        u = torch.linalg.qr(torch.cat([u, extra.to(u.device)], 1))[0]
    dirs = torch.linalg.solve_triangular(chol.T, u[:, :r], upper=True)
    a = (dirs if z is None else z @ dirs).T
    return retract(a.float(), q_prev)


def kaiming_rows(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """kohya's lora_down init (kaiming-uniform with a = sqrt(5)): U(-1/sqrt(n), 1/sqrt(n))."""
    bound = 1.0 / n**0.5
    return (torch.rand(r, n, generator=generator) * 2 - 1) * bound


def complement_basis(q: torch.Tensor | None, n: int) -> torch.Tensor:
    """An orthonormal basis (n x (n - K)) of the complement of span(Q) (float64)."""
    if q is None or q.shape[1] == 0:
        return torch.eye(n, dtype=torch.float64)
    k = q.shape[1]
    full, _ = torch.linalg.qr(q.double(), mode="complete")
    return full[:, k:]


def protected_subspace(
    s_old: torch.Tensor, q_prev: torch.Tensor | None, r: int, energy: float, margin: float, reserve: int = 0
) -> tuple[torch.Tensor, dict]:
    """The top-energy directions of S_<t (within the complement of the earlier bases Q) to keep new bases out of.

    Takes the fewest top eigenvectors of P S_<t P (P = I - Q Q^T) that hold ``energy`` of its trace, but
    never so many that fewer than ceil(margin * r) directions stay free: the achieved energy fraction is
    then lower, and reported. Returns (E, info): E (n x p, orthogonal to Q) and
    {"protected": p, "energy": fraction of P S_<t P's trace in span(E), "free": directions left}.
    """
    n = s_old.shape[0]
    z = complement_basis(q_prev, n)
    room = z.shape[1] - reserve
    cap = max(0, room - math.ceil(margin * r))
    s_z = z.T @ s_old.double() @ z
    evals, evecs = torch.linalg.eigh((s_z + s_z.T) / 2)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    total = float(evals.sum())
    if total <= 0 or cap == 0 or energy <= 0:
        return torch.zeros(n, 0), {"protected": 0, "energy": 0.0, "free": room}
    cover = torch.cumsum(evals, 0) / total
    wanted = int(torch.searchsorted(cover, torch.tensor(min(energy, 1.0), dtype=cover.dtype)).item()) + 1
    p = min(wanted, cap)
    e = (z @ evecs[:, :p]).float().contiguous()
    return e, {"protected": p, "energy": float(cover[p - 1]), "free": room - p}
