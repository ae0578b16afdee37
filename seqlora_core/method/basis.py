"""Learned LoRA bases on the Stiefel manifold, kept orthogonal to earlier concepts' bases."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def project_out(g: torch.Tensor, q: torch.Tensor | None, complement: torch.Tensor | None = None) -> torch.Tensor:
    """G P with P = I - Q Q^T: remove the components of G's rows along earlier bases (batched).

    With ``complement``, an orthonormal basis C of the complement of span(Q) (see ``narrow_complement``),
    P = C C^T is applied through C instead: the same projection, cheaper when C is narrower than Q."""
    if complement is not None:
        return (g @ complement) @ complement.mT
    if q is None or q.shape[-1] == 0:
        return g
    return g - (g @ q) @ q.mT


def narrow_complement(qs: list[torch.Tensor | None], n: int) -> torch.Tensor | None:
    """Stacked orthonormal bases (G x n x max(n - K_i), zero-padded) of the complements of the layers' Q_i
    (n x K_i), when the widest of them is narrower than the widest Q_i (a projection then costs less; they
    are built once per training, one QR per layer); else None (project with Q). A layer without Q (nothing
    to stay orthogonal to) makes it None."""
    if any(q is None for q in qs):
        return None
    widest_q = max(q.shape[1] for q in qs)
    if n - min(q.shape[1] for q in qs) >= widest_q:
        return None
    parts = [complement_basis(q, n, q.device).float() for q in qs]
    out = torch.zeros(len(parts), n, max(p.shape[1] for p in parts), device=parts[0].device)
    for i, p in enumerate(parts):
        out[i, :, : p.shape[1]] = p
    return out


def stiefel_tangent(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Project a Euclidean gradient G onto the tangent space of {A : A A^T = I} at A."""
    x = g @ a.mT
    return g - 0.5 * (x + x.mT) @ a


def retract(a: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """Back onto the feasible set: re-project on the complement of Q, then QR."""
    return orthonormal_rows(project_out(a, q))


def kaiming_rows(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """kohya's lora_down init (kaiming-uniform with a = sqrt(5)): U(-1/sqrt(n), 1/sqrt(n))."""
    bound = 1.0 / n**0.5
    return (torch.rand(r, n, generator=generator) * 2 - 1) * bound


def complement_basis(q: torch.Tensor | None, n: int, device: torch.device | None = None) -> torch.Tensor:
    """An orthonormal basis (n x (n - K)) of the complement of span(Q) (float64)."""
    if q is None or q.shape[1] == 0:
        return torch.eye(n, dtype=torch.float64, device=device)
    k = q.shape[1]
    # the last n - K columns of Q's complete QR factor, applied to [0; I] from its Householder reflectors
    # (half the cost of forming the whole n x n factor)
    reflectors, tau = torch.geqrf(q.double())
    tail = torch.zeros(n, n - k, dtype=torch.float64, device=reflectors.device)
    if n > k:
        tail[k:].copy_(torch.eye(n - k, dtype=torch.float64, device=reflectors.device))
        tail = torch.ormqr(reflectors, tau, tail)
    return tail


@dataclass
class FreeSpace:
    """Where a new basis may go at one layer: the complement of the earlier bases, less the protected
    top-energy directions of the earlier activations. ``z`` (n x f) is orthonormal and diagonalises the
    earlier concepts' moment there: z^T S_<t z = diag(evals)."""

    z: torch.Tensor
    evals: torch.Tensor
    protected: torch.Tensor  # n x p: the protected directions (orthogonal to the earlier bases)
    protection: dict | None  # {"protected", "energy", "free"} when protection was asked for


@dataclass
class LowRankMoment:
    """A moment in the form U diag(d) U^T + c I (U: n x m, float64): the earlier concepts' sketches, each
    with its isotropic tail, are exactly this with m = the sum of their ranks, usually much less than n."""

    u: torch.Tensor
    d: torch.Tensor
    c: float = 0.0

    @property
    def n(self) -> int:
        return self.u.shape[0]

    def dense(self) -> torch.Tensor:
        """The n x n matrix."""
        eye = torch.eye(self.n, dtype=self.u.dtype, device=self.u.device)
        return (self.u * self.d) @ self.u.T + self.c * eye

    def trace(self) -> float:
        return float((self.d * self.u.pow(2).sum(0)).sum()) + self.n * self.c

    def plus(self, u: torch.Tensor, scale: float) -> LowRankMoment:
        """This moment plus ``scale * u u^T``."""
        u = u.to(self.u)
        d = torch.full((u.shape[1],), float(scale), dtype=self.d.dtype, device=self.d.device)
        return LowRankMoment(torch.cat([self.u, u], 1), torch.cat([self.d, d]), self.c)


def free_space(
    s_old: torch.Tensor | LowRankMoment,
    q_prev: torch.Tensor | None,
    r: int,
    protect_energy: float | None = None,
    margin: float = 2.0,
    reserve: int = 0,
) -> FreeSpace:
    """The complement Z of the earlier bases Q, with S_<t diagonalised in it.

    With ``protect_energy`` (theta) the fewest top eigenvectors of P S_<t P (P = I - Q Q^T) holding theta
    of its trace are protected (left out of the free space), but never so many that fewer than
    ceil(margin * r) directions stay free: the achieved energy fraction is then lower, and reported.

    A dense ``s_old`` costs one complete QR and one n x n eigh (O(n^3)). A :class:`LowRankMoment` whose
    rank plus Q's columns is small against n costs O(n^2 (K + m)): outside the span of P U, P S_<t P is
    c times the identity, so only an m x m eigh is needed (the same space, to rounding; directions of
    equal eigenvalue may come in another order).
    """
    k = 0 if q_prev is None else q_prev.shape[1]
    if isinstance(s_old, LowRankMoment):
        if 4 * (k + s_old.u.shape[1]) > s_old.n:
            s_old = s_old.dense()
        else:
            basis, evals = _complement_eigen_lowrank(s_old, q_prev)
            return _split_protected(basis, evals, r, protect_energy, margin, reserve)
    n = s_old.shape[0]
    z = complement_basis(q_prev, n, s_old.device)
    s_z = z.T @ s_old.double() @ z
    evals, evecs = torch.linalg.eigh((s_z + s_z.T) / 2)
    evals, evecs = evals.flip(0), evecs.flip(1)
    return _split_protected(z @ evecs, evals, r, protect_energy, margin, reserve)


def _complement_eigen_lowrank(s: LowRankMoment, q_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis n x (n - K), eigenvalues descending) of P (U diag(d) U^T + c I) P on the complement of Q."""
    u = s.u.double()
    q = None if q_prev is None or q_prev.shape[1] == 0 else q_prev.to(u.device, torch.float64)
    y = project_out(u.T, q).T  # P U
    inside = torch.zeros(s.n, 0, dtype=u.dtype, device=u.device)
    mu = torch.zeros(0, dtype=u.dtype, device=u.device)
    if y.shape[1]:
        w, sv, _ = torch.linalg.svd(y, full_matrices=False)
        w = w[:, sv > 1e-9 * max(float(sv.max()), 1e-300)]  # an orthonormal basis of span(P U)
        if w.shape[1]:
            b = w.T @ y  # W^T U = W^T P U, as W is orthogonal to Q
            core = (b * s.d.to(b)) @ b.T
            mu, v = torch.linalg.eigh((core + core.T) / 2)
            inside = w @ v
    known = inside if q is None else torch.cat([q, inside], 1)
    if known.shape[1]:
        rest = torch.linalg.qr(known, mode="complete")[0][:, known.shape[1] :]
    else:
        rest = torch.eye(s.n, dtype=u.dtype, device=u.device)
    basis = torch.cat([inside, rest], 1)
    evals = torch.cat([mu, torch.zeros(rest.shape[1], dtype=u.dtype, device=u.device)]) + s.c
    order = torch.argsort(evals, descending=True, stable=True)
    return basis[:, order], evals[order]


def _split_protected(
    basis: torch.Tensor, evals: torch.Tensor, r: int, protect_energy: float | None, margin: float, reserve: int
) -> FreeSpace:
    """The free space from an eigenbasis of the complement (eigenvalues descending), less the protected
    top directions (see :func:`free_space`)."""
    evals = evals.clamp_min(0)
    p, info = 0, None
    if protect_energy is not None:
        room = basis.shape[1] - reserve
        cap = max(0, room - math.ceil(margin * r))
        total = float(evals.sum())
        if total > 0 and cap > 0 and protect_energy > 0:
            cover = torch.cumsum(evals, 0) / total
            target = torch.tensor(min(protect_energy, 1.0), dtype=cover.dtype, device=cover.device)
            p = min(int(torch.searchsorted(cover, target).item()) + 1, cap)
            info = {"protected": p, "energy": float(cover[p - 1]), "free": room - p}
        else:
            info = {"protected": 0, "energy": 0.0, "free": room}
    return FreeSpace(basis[:, p:].contiguous(), evals[p:].contiguous(), basis[:, :p].contiguous(), info)


def generalized_eigen_basis(f_new: torch.Tensor, space: FreeSpace, r: int, delta: float) -> torch.Tensor:
    """Top-r directions maximising a^T S_new a / a^T (S_<t + delta I) a inside the free space.

    ``S_new = F F^T`` is given by its sketch factor F (n x k). In the free space's coordinates S_<t is
    diagonal, so the pencil is whitened by 1 / sqrt(evals + delta): its top eigenvectors are those whitened
    top left singular vectors of the whitened Z^T F. Returns A (r x n) with orthonormal rows in span(Z).
    """
    if space.z.shape[1] < r:
        raise ValueError(f"only {space.z.shape[1]} free directions left, rank {r} needs {r}")
    inv = (space.evals + delta).rsqrt().unsqueeze(1)
    g = inv * (space.z.T @ f_new.to(space.z))
    u = torch.linalg.svd(g, full_matrices=False)[0]
    if u.shape[1] < r:  # the concept spans fewer than r directions: complete with seeded ones
        extra = torch.randn(u.shape[0], r - u.shape[1], generator=torch.Generator().manual_seed(r), dtype=u.dtype)
        u = torch.linalg.qr(torch.cat([u, extra.to(u.device)], 1))[0]
    a = (space.z @ (inv * u[:, :r])).T
    return orthonormal_rows(a.float())
