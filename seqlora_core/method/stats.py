"""Activation statistics: streaming second moments of layer inputs, reduced to rank-k sketches."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .targets import LayerSpec

TAILS = ("mean", "max", "none")


@dataclass
class Sketch:
    """S ~ U diag(s) U^T + tau (I - U U^T): the top eigenpairs of an uncentred second moment E[x x^T] and
    the energy the top eigenpairs leave out, spread over the other n - k directions (the tail).

    ``trace`` is the full moment's trace, so the tail's energy is ``trace - sum(s)``. Two tail levels:
    ``tail_mean`` spreads it evenly (the estimate of S: interference, penalty and basis use it) and
    ``tail_max`` = min(s_k, trace - sum(s)) bounds every left-out eigenvalue from above (so the model with
    it dominates S, and the forgetting bound built on it is a certificate). A NaN trace means unknown.
    """

    U: torch.Tensor  # n x k, orthonormal columns
    s: torch.Tensor  # k, non-negative, descending
    trace: float  # trace of the full moment (so coverage = s.sum() / trace)

    @property
    def factor(self) -> torch.Tensor:
        """F with F F^T = U diag(s) U^T (n x k)."""
        return self.U * self.s.clamp_min(0).sqrt()

    @property
    def tail_known(self) -> bool:
        return math.isfinite(self.trace)

    @property
    def residual(self) -> float:
        """Energy outside the top eigenpairs: trace - sum(s) (0 when unknown)."""
        if not self.tail_known:
            return 0.0
        return max(self.trace - float(self.s.double().sum()), 0.0)

    def tail(self, kind: str = "mean") -> float:
        """The tail level tau for ``kind`` in TAILS ("none" drops the tail, as version 1 did)."""
        n, k = self.U.shape
        if kind == "none" or n <= k:
            return 0.0
        if kind == "mean":
            return self.residual / (n - k)
        if kind == "max":
            return min(float(self.s[-1]) if k else self.residual, self.residual)
        raise ValueError(f"tail: {kind!r}; use one of {TAILS}")

    def dense(self, tail: str = "none") -> torch.Tensor:
        """The n x n matrix the sketch stands for (with the chosen tail)."""
        f = self.factor
        out = f @ f.T
        tau = self.tail(tail)
        if tau > 0:
            u = self.U.to(out.dtype)
            out = out + tau * (torch.eye(out.shape[0], dtype=out.dtype, device=out.device) - u @ u.T)
        return out


def layer_rows(x: torch.Tensor, spec: LayerSpec, module: nn.Module) -> torch.Tensor:
    """A layer's input as rows of length n (tokens for a Linear, unfolded patches for a conv)."""
    if spec.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    if spec.kernel == (1, 1) and getattr(module, "stride", (1, 1)) == (1, 1):
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    conv = module.base if hasattr(module, "base") else module
    cols = F.unfold(x, spec.kernel, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def top_eigenpairs(moment: torch.Tensor, k: int, power_iters: int = 3, oversample: int = 16):
    """The k largest eigenpairs (descending) of a symmetric PSD matrix.

    Small matrices get an exact eigendecomposition; larger ones a seeded randomised range finder with
    power iterations, O(n^2 k) instead of O(n^3): the top few eigenpairs are all a sketch keeps.
    """
    m = (moment + moment.T) / 2
    n = m.shape[0]
    k = min(k, n)
    if n <= 4 * (k + oversample):
        evals, evecs = torch.linalg.eigh(m)
        return evals.flip(0)[:k], evecs.flip(1)[:, :k]
    g = torch.Generator().manual_seed(n)
    y = m @ torch.randn(n, k + oversample, generator=g, dtype=m.dtype).to(m.device)
    for _ in range(power_iters):
        y = m @ torch.linalg.qr(y)[0]
    q = torch.linalg.qr(y)[0]
    evals, evecs = torch.linalg.eigh(q.T @ m @ q)
    return evals.flip(0)[:k], (q @ evecs.flip(1))[:, :k]


def sketch_moment(moment: torch.Tensor, k_max: int = 32, energy: float = 0.99) -> Sketch:
    """Reduce an n x n PSD moment to the fewest top eigenpairs covering ``energy`` of its trace (<= k_max)."""
    m = moment.double()
    trace = float(torch.diagonal(m).sum())
    evals, evecs = top_eigenpairs(m, k_max)
    evals = evals.clamp_min(0)
    if trace <= 0:
        return Sketch(evecs[:, :1].float().contiguous(), torch.zeros(1), 0.0)
    cover = torch.cumsum(evals, 0) / trace
    k = int(torch.searchsorted(cover, torch.tensor(energy, dtype=cover.dtype)).item()) + 1
    k = max(1, min(k, evals.numel()))
    return Sketch(evecs[:, :k].float().contiguous(), evals[:k].float().contiguous(), trace)


class MomentRecorder:
    """Accumulates sum(x x^T) and the row count of chosen layers' inputs through forward pre-hooks.

    Linear layers that read the same tensor (an attention's q, k and v; every cross-attention's k and v
    read the one text context) share one product while that tensor lives and is unchanged."""

    def __init__(self, model: nn.Module, specs: Iterable[LayerSpec]):
        self.model = model
        self.specs = {s.name: s for s in specs}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list = []
        self._shared: dict[int, tuple[weakref.ref, object, torch.Tensor, int]] = {}

    @staticmethod
    def _stamp(x: torch.Tensor) -> object:
        """What tells a tensor's contents apart over time. Inference tensors keep no version counter: for them
        identity decides, which holds for attention blocks (none changes a layer's input in place)."""
        try:
            return x._version
        except RuntimeError:
            return (x.data_ptr(), tuple(x.shape))

    def _product(self, x: torch.Tensor, spec: LayerSpec, module: nn.Module) -> tuple[torch.Tensor, int]:
        """(sum of x x^T over the layer's input rows, row count), computed once per living linear input."""
        if spec.kind == "linear":
            stamp = self._stamp(x)
            hit = self._shared.get(id(x))
            if hit is not None and hit[0]() is x and hit[1] == stamp:
                return hit[2], hit[3]
        rows = layer_rows(x.detach(), spec, module).float()
        acc = rows.T @ rows
        if spec.kind == "linear":
            self._shared = {k: v for k, v in self._shared.items() if v[0]() is not None}  # drop freed inputs
            self._shared[id(x)] = (weakref.ref(x), stamp, acc, rows.shape[0])
        return acc, rows.shape[0]

    def _hook(self, name: str, spec: LayerSpec, module: nn.Module) -> Callable:
        def hook(_mod: nn.Module, args: tuple) -> None:
            acc, count = self._product(args[0], spec, module)
            if name in self.sums:
                self.sums[name] += acc
            else:
                self.sums[name] = acc.clone()  # the product may be shared with other layers
            self.counts[name] = self.counts.get(name, 0) + count

        return hook

    def __enter__(self) -> MomentRecorder:
        for name, spec in self.specs.items():
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._hook(name, spec, module)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._shared.clear()

    def moments(self) -> dict[str, torch.Tensor]:
        """E[x x^T] per layer (float32, on the layer's device)."""
        missing = [n for n in self.specs if n not in self.sums]
        if missing:
            raise RuntimeError(
                f"no activations reached {len(missing)} adapted layers (first: {missing[0]!r}); "
                "the loss closure must run the model that holds these layers"
            )
        return {n: self.sums[n] / max(self.counts[n], 1) for n in self.specs}


def record_moments(
    model: nn.Module,
    specs: Iterable[LayerSpec],
    run_batch: Callable[[int], object],
    n_batches: int,
) -> dict[str, torch.Tensor]:
    """Second moments of the given layers' inputs over ``n_batches`` no-grad calls of ``run_batch(i)``."""
    with MomentRecorder(model, specs) as rec, torch.no_grad():
        for i in range(n_batches):
            run_batch(i)
    return rec.moments()


def sketches_from_moments(moments: dict[str, torch.Tensor], k_max: int = 32, energy: float = 0.99) -> dict[str, Sketch]:
    """Per-layer sketches of per-layer moments. Layers with equal moments (every cross-attention's k and v
    read the one text context) share one sketch, computed once."""
    out: dict[str, Sketch] = {}
    done: dict[tuple, list[tuple[torch.Tensor, Sketch]]] = {}  # by (shape, trace): equal moments share both
    for name, m in moments.items():
        seen = done.setdefault((tuple(m.shape), float(m.diagonal().sum())), [])
        same = next((sk for other, sk in seen if torch.equal(other, m)), None)
        out[name] = same if same is not None else sketch_moment(m, k_max, energy)
        if same is None:
            seen.append((m, out[name]))
    return out


def collect_rows(
    model: nn.Module,
    specs: Iterable[LayerSpec],
    run_batch: Callable[[int], object],
    batch_ids: Iterable[int],
    max_rows: int = 4096,
) -> dict[str, torch.Tensor]:
    """The input rows (float32, CPU) of the given layers over no-grad calls of ``run_batch(i)``: samples of
    the activations themselves, for checks that moments cannot make (e.g. how often a bound is exceeded).
    At most ``max_rows`` rows per layer are kept (evenly strided)."""
    specs = list(specs)
    store: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    handles = []
    for spec in specs:
        module = model.get_submodule(spec.name)

        def hook(_mod: nn.Module, args: tuple, spec: LayerSpec = spec, module: nn.Module = module) -> None:
            store[spec.name].append(layer_rows(args[0].detach(), spec, module).float().cpu())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for i in batch_ids:
                run_batch(i)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, parts in store.items():
        rows = torch.cat(parts) if parts else torch.zeros(0, 0)
        if rows.shape[0] > max_rows:
            rows = rows[torch.linspace(0, rows.shape[0] - 1, max_rows).long()]
        out[name] = rows
    return out
