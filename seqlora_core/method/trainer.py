"""Train one concept into a bank: the first-order, two time-scale bilevel scheme of docs/method.md.

Model-agnostic: the caller gives a model, a loss closure ``loss_fn(model, batch)`` and a batch function
``batches(step)`` that is a pure function of the step index (so a resumed run replays the same data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..baselines.frozen_slots import frozen_slot
from ..files import atomic_write_bytes
from . import basis as bs
from .adapters import AdapterLayer, inject, remove
from .bank import BankFormatError, Concept, ConceptBank, ConceptLayer, DuplicateConceptError
from .compose import Composition, compose
from .interference import dense_gram, energy_of_gram
from .methods import Method, get_method, method_of
from .selection import check_concept_name, check_trigger
from .stats import MomentRecorder, Sketch, record_moments, sketches_from_moments
from .targets import LayerSpec, find_targets

log = logging.getLogger("seqlora")

REPROJECT_EVERY = 10
MAX_TURN = 0.2  # largest Frobenius step of a basis (r x n, orthonormal rows) in one training step
LAMBDA_HALF = 10.0  # the dual variable at which the penalty acts at half its full strength
# The final statistics are recorded during the last ``stats_batches`` training steps (their forward passes,
# adapter active) instead of in a separate pass, when the training is at least this many times longer than
# that window (so the adapter barely moves inside it) and this run executes the whole window.
FINAL_STATS_IN_STEPS_MIN = 4


def _theta(lam: torch.Tensor) -> torch.Tensor:
    """How strongly the interference constraint acts on the basis step, from 0 (lambda = 0) towards 1."""
    return lam / (lam + LAMBDA_HALF)


LossFn = Callable[[nn.Module, Any], torch.Tensor]
BatchFn = Callable[[int], Any]


MAX_LR = 1.0  # a larger step moves a factor by more than its own size: training only diverges
MAX_STEPS = 10_000_000


class TrainingCancelled(RuntimeError):
    """Training stopped on request; the checkpoint holds the progress so far."""

    def __init__(self, step: int, checkpoint: str | None):
        where = f"; progress saved to {checkpoint!r}, run again to resume" if checkpoint else ""
        super().__init__(f"training cancelled at step {step}{where}")
        self.step = step
        self.checkpoint = checkpoint


class TrainingDiverged(FloatingPointError):
    """The loss or the factors became NaN or infinite; nothing from that step on was saved."""


class ResumeMismatchError(ValueError):
    """The checkpoint was made from other data or settings; the message says which and how to start over."""


@dataclass
class TrainConfig:
    """Everything that defines one concept's training. ``lr`` is eta_B; eta_A = rho * lr."""

    name: str
    triggers: list[str] = field(default_factory=list)
    method: str = "seqlora"
    rank: int = 4
    steps: int = 500
    lr: float = 1e-4  # step size at rank 1: rank r steps the up factor (and a free basis) by lr / sqrt(r)
    rho: float = 0.1
    weight_decay: float = 0.0  # gamma of the lower level
    prior_loss_weight: float = 0.0  # > 0: add this times the loss on ``prior_batches`` (prior preservation)
    budget: float = 0.05  # eps: sum_j R(t->j) <= eps * R(t->t)
    dual_lr: float = 1.0  # eta_lambda
    dual_every: int = 10  # K
    lam_max: float = 100.0  # cap of the dual variable
    protect: str = "adaptive"  # activation-space protection of the earlier concepts and the prior: adaptive | off
    protect_energy: float = 0.9  # theta: fraction of S_<t's energy to protect, when room allows
    protect_margin: float = 2.0  # keep at least ceil(margin * rank) free directions per layer
    targets: str | tuple[str, ...] = "attn"
    context: str | None = None  # "stacked" | "base" | "mixed"; None = the method's default
    seed: int = 0
    stats_batches: int = 8
    sketch_rank: int = 32
    sketch_energy: float = 0.99
    penalty_rank: int = 64
    reserve: int = 0
    checkpoint_path: str | None = None
    checkpoint_every: int = 50
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA), "bf16", "fp16", "fp32"
    gradient_checkpointing: bool = False
    layer_naming: str = "module"
    architecture: str = "unknown"
    extra_info: dict = field(default_factory=dict)  # copied into Concept.info (e.g. a host's cache key)
    # what the batches are made from (digests of the images and captions, resolution, batch size, caption
    # template), set by whoever prepares the data: part of the resume key, so a checkpoint is resumed only
    # with the data it was made from
    data_signature: dict = field(default_factory=dict)

    def validate(self) -> Method:
        check_concept_name(self.name, "name")
        for i, t in enumerate(self.triggers):
            check_trigger(t, "triggers" if len(self.triggers) == 1 else f"triggers[{i}]")
        for key in ("rank", "steps", "seed", "stats_batches", "sketch_rank", "penalty_rank", "reserve"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key}: {value!r} is not a whole number")
        for key in ("lr", "rho", "weight_decay", "prior_loss_weight", "budget", "dual_lr", "lam_max"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{key}: {value!r}; give a finite number")
        if not 1 <= self.rank <= 256:
            raise ValueError(f"rank: {self.rank} is out of range; use 1..256 (4-16 is typical)")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps: {self.steps}; use 1..{MAX_STEPS}")
        if not 0 < self.lr <= MAX_LR:
            raise ValueError(
                f"lr: {self.lr:g} is out of range; use a learning rate in (0, {MAX_LR:g}] (1e-4 is typical)"
            )
        if not self.rho > 0:
            raise ValueError(f"rho: {self.rho}; the basis' step factor must be positive (0.1 is typical)")
        if self.weight_decay < 0 or self.dual_lr < 0:
            raise ValueError("weight_decay, dual_lr: use 0 or a positive number")
        if self.seed < 0:
            raise ValueError(f"seed: {self.seed}; use a number >= 0")
        if self.prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight: {self.prior_loss_weight}; use 0 (off) or a positive weight")
        if not self.budget >= 0:
            raise ValueError(f"budget: {self.budget}; the interference budget must be a number >= 0")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: {self.checkpoint_every!r}; save progress every 1 or more steps")
        if min(self.stats_batches, self.sketch_rank, self.penalty_rank, self.dual_every) < 1 or self.reserve < 0:
            raise ValueError("stats_batches, sketch_rank, penalty_rank, dual_every: use 1 or more; reserve: 0 or more")
        if not 0 < self.sketch_energy <= 1:
            raise ValueError(f"sketch_energy: {self.sketch_energy}; use a fraction in (0, 1] (0.99 is typical)")
        if self.protect not in ("adaptive", "off"):
            raise ValueError(f"protect: {self.protect!r}; use 'adaptive' or 'off'")
        if not 0 <= self.protect_energy <= 1:
            raise ValueError(f"protect_energy: {self.protect_energy}; use a fraction in [0, 1] (0.99 is typical)")
        if not self.protect_margin >= 1:
            raise ValueError(f"protect_margin: {self.protect_margin}; use at least 1 (free directions per rank)")
        if not self.lam_max > 0:
            raise ValueError(f"lam_max: {self.lam_max}; the cap of the dual variable must be positive")
        if self.context not in (None, "stacked", "base", "mixed"):
            raise ValueError(f"context: {self.context!r}; use 'stacked', 'base' or 'mixed'")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision: {self.precision!r}; use auto, bf16, fp16 or fp32")
        return get_method(self.method)

    def resume_settings(self, bank_fp: str, earlier: list[str], model: str = "") -> dict:
        """What a checkpoint must match to be resumed: every setting but the step count and where and how
        often progress is saved, the data (``data_signature``), the bank's layers and earlier concepts, and
        a digest of the model's adapted weights."""
        d = dataclasses.asdict(self)
        for k in ("steps", "checkpoint_path", "checkpoint_every", "extra_info"):
            d.pop(k)
        d["bank"] = bank_fp
        d["earlier"] = earlier
        d["model"] = model
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    def resume_key(self, bank_fp: str, earlier: list[str], model: str = "") -> str:
        """A short hash of :meth:`resume_settings`."""
        settings = self.resume_settings(bank_fp, earlier, model)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def settings_changes(old: dict, new: dict) -> list[str]:
    """What differs between two :meth:`TrainConfig.resume_settings`, as 'what: old -> new' lines."""
    names = {"bank": "the bank's layers", "earlier": "the bank's earlier concepts", "model": "the base model's weights"}
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "data_signature" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"data {k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif key in names:
            out.append(names[key])
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def discard_checkpoint(config: TrainConfig) -> None:
    """Remove the concept's checkpoint: call it once the bank holding the result is durably written."""
    if config.checkpoint_path:
        Path(config.checkpoint_path).unlink(missing_ok=True)


def finished_into(bank: ConceptBank | None, config: TrainConfig) -> bool:
    """True when ``bank`` holds the concept whose training left ``config.checkpoint_path`` behind: the run
    wrote its bank but stopped before removing the checkpoint (which may then go)."""
    path = config.checkpoint_path
    if bank is None or config.name not in bank.names() or not path or not Path(path).is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            key = (f.metadata() or {}).get("key")
    except Exception:
        return False
    return key is not None and bank.concept(config.name).info.get("resume_key") == key


def _weights_digest(model: nn.Module, specs: list[LayerSpec]) -> str:
    """A cheap digest of the adapted layers' base weights (every few thousandth value)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for spec in specs:
            try:
                module = model.get_submodule(spec.name)
            except AttributeError:
                continue
            w = getattr(getattr(module, "base", module), "weight", None)
            if w is None:
                continue
            flat = w.detach().reshape(-1)
            h.update(flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


@dataclass
class StepInfo:
    """Reported to ``on_step`` after every step."""

    step: int  # steps done
    total: int
    loss: float
    interference: float  # relative interference on earlier concepts (sum over layers), if constrained
    lam: float  # mean dual variable


@dataclass
class TrainCallbacks:
    on_step: Callable[[StepInfo], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_phase: Callable[[str], None] | None = None  # "prior stats", "concept stats", "train", "final stats"


# ---------------------------------------------------------------------------------------------------
# small batched optimiser state


class Adam:
    """Adam moments for one (stacked) tensor; ``direction`` returns the bias-corrected update direction."""

    def __init__(self, like: torch.Tensor, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = 0
        self.b1, self.b2, self.eps = b1, b2, eps

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        self.t += 1
        self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        mh = self.m / (1 - self.b1**self.t)
        vh = self.v / (1 - self.b2**self.t)
        return mh / (vh.sqrt() + self.eps)


class ScaledMomentum:
    """Momentum with one second-moment scalar per layer (rows of a G x r x n stack): a scale-free step that,
    unlike per-coordinate Adam, does not blow up directions where the gradient is only noise. The basis uses
    it, so directions the loss does not ask for stay where the constraint put them."""

    def __init__(self, like: torch.Tensor, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-12):
        self.m = torch.zeros_like(like)
        self.v = torch.zeros(like.shape[0], *([1] * (like.dim() - 1)), dtype=like.dtype, device=like.device)
        self.t = 0
        self.b1, self.b2, self.eps = b1, b2, eps

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        self.t += 1
        self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v.mul_(self.b2).add_(g.pow(2).mean(tuple(range(1, g.dim())), keepdim=True), alpha=1 - self.b2)
        mh = self.m / (1 - self.b1**self.t)
        vh = self.v / (1 - self.b2**self.t)
        return mh / (vh.sqrt() + self.eps)


@dataclass
class Moment:
    """A second moment as the penalty sees it: U diag(s) U^T + tau (I - U U^T) (stacked per group)."""

    U: torch.Tensor  # G x n x k (zero-padded columns change nothing)
    root_s: torch.Tensor  # G x 1 x k: sqrt of the eigenvalues
    tau: torch.Tensor  # G: tail level

    def energy(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """tr(B A S A^T B^T) per layer (G), through r x k and r x r products only."""
        au = a @ self.U
        e = (b @ (au * self.root_s)).pow(2).sum((1, 2))
        if bool((self.tau > 0).any()):
            gram_b = b.mT @ b
            whole = (gram_b * (a @ a.mT)).sum((1, 2))
            e = e + self.tau * (whole - (b @ au).pow(2).sum((1, 2)))
        return e

    def energy_and_gradients(
        self, a: torch.Tensor, b: torch.Tensor, with_b: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(E, dE/dA, dE/dB or None) of E = tr(B A S A^T B^T) in closed form, without autograd: with
        A S = (A U) diag(s - tau) U^T + tau A, dE/dA = 2 B^T B A S and dE/dB = 2 B A S A^T."""
        au = a @ self.U
        weighted = au * (self.root_s.pow(2) - self.tau.view(-1, 1, 1))
        a_s = weighted @ self.U.mT + self.tau.view(-1, 1, 1) * a  # G x r x n
        a_s_at = weighted @ au.mT + self.tau.view(-1, 1, 1) * (a @ a.mT)  # G x r x r
        gram_b = b.mT @ b
        energy = (gram_b * a_s_at).sum((1, 2))
        grad_b = 2 * b @ a_s_at if with_b else None
        return energy, 2 * gram_b @ a_s, grad_b


@dataclass
class LayerInit:
    """One layer at the start of training: its basis, constraint and the moments of its penalty."""

    A: torch.Tensor
    q: torch.Tensor | None = None  # n x K: directions the basis must stay orthogonal to
    old: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (U, s, tau) of S_<t seen from the free space
    own: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (U, s, tau) of the concept's own moment
    soft: bool = False
    protection: dict | None = None


@dataclass
class Group:
    """Layers of identical shape trained together as stacked tensors (one kernel launch per op)."""

    specs: list[LayerSpec]
    A: torch.Tensor  # G x r x n  (requires grad unless frozen)
    B: torch.Tensor  # G x m x r
    q: torch.Tensor | None  # G x n x K: earlier bases (+ protected directions) to stay orthogonal to
    old: Moment | None  # the earlier concepts' + prior's moment (mean over them), as A can see it
    own: Moment | None  # this concept's own moment
    soft: list[bool]
    lam: torch.Tensor  # G
    protection: list[dict | None]
    opt_a: Adam | ScaledMomentum | None = None
    opt_b: Adam | None = None
    last_rel: torch.Tensor | None = None  # G, detached R_old / R_self
    q_free: torch.Tensor | None = None  # G x n x C: the complement of q, when narrower (the same projection)


# ---------------------------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if precision == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _pad_cols(mats: list[torch.Tensor | None], n: int) -> torch.Tensor | None:
    """Stack n x k_i matrices into G x n x max(k), zero-padding (zero columns change no product)."""
    width = max((m.shape[1] for m in mats if m is not None), default=0)
    if width == 0:
        return None
    out = torch.zeros(len(mats), n, width)
    for i, m in enumerate(mats):
        if m is not None:
            out[i, :, : m.shape[1]] = m
    return out


def _earlier_moment(
    bank: ConceptBank, layer: str, n: int, tail: str, device: torch.device
) -> tuple[bs.LowRankMoment, int]:
    """(S_<t, count): the prior's moment plus every earlier concept's (sketches with their tails), float64 on
    ``device``, as U diag(s - tau) U^T + sum(tau) I from the stacked sketches."""
    sketches = [sk for sk in [bank.prior.get(layer)] + [c.layers[layer].sketch for c in bank.concepts] if sk]
    empty = torch.zeros(n, 0, dtype=torch.float64, device=device)
    if not sketches:
        return bs.LowRankMoment(empty, empty[0]), 0
    taus = [sk.tail(tail) for sk in sketches]
    u = torch.cat([sk.U for sk in sketches], 1).to(device, torch.float64)
    d = torch.cat([sk.s.double().clamp_min(0) - t for sk, t in zip(sketches, taus, strict=True)]).to(device)
    return bs.LowRankMoment(u, d, float(sum(taus))), len(sketches)


def _old_moment(space: bs.FreeSpace, count: int, k: int, tail: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(U, s, tau) of the mean earlier moment S_<t / count as the new basis can see it: in the free space,
    where it is diagonal: its top-k directions and the mean of the rest."""
    k = min(k, space.evals.numel())
    rest = space.evals[k:]
    tau = float(rest.mean()) / count if tail != "none" and rest.numel() else 0.0
    return space.z[:, :k].float(), space.evals[:k].float() / count, tau


def _basis_rule(method_name: str) -> str:
    """The basis rule of a stored concept's method ("free" for an imported LoRA)."""
    m = method_of(method_name)
    return m.basis if m is not None else "free"


def _resolve_layers(model: nn.Module, bank: ConceptBank | None, cfg: TrainConfig) -> ConceptBank:
    if bank is None:
        bank = ConceptBank(find_targets(model, cfg.targets), cfg.layer_naming, cfg.architecture)
    else:
        bank.check_model(model)
        if cfg.name in bank.names():
            raise DuplicateConceptError(
                f"concept name {cfg.name!r} is already in the bank; choose another name, or remove the old "
                "concept from the bank first"
            )
        for c in bank.concepts:
            for layer, cl in c.layers.items():
                if not (bool(torch.isfinite(cl.A).all()) and bool(torch.isfinite(cl.B).all())):
                    raise BankFormatError(
                        f"concept {c.name!r} holds NaN or infinite values at layer {layer!r}; remove it from "
                        "the bank before training on top of it"
                    )
    narrowest = min(bank.layers, key=lambda s: s.in_features)
    if cfg.rank > narrowest.in_features:
        raise ValueError(
            f"rank: {cfg.rank} is more than layer {narrowest.name!r} can hold ({narrowest.in_features} inputs); "
            f"use at most {narrowest.in_features}"
        )
    return bank


def _run_stats(
    model: nn.Module, specs: list[LayerSpec], loss_fn: LossFn, batch_fn: BatchFn, n: int, precision: str
) -> dict[str, torch.Tensor]:
    device = _device_of(model)

    def run(i: int) -> None:
        with _autocast(device, precision):
            loss_fn(model, batch_fn(i))

    return record_moments(model, specs, run, n)


# ---------------------------------------------------------------------------------------------------


class _Run:
    """State of one concept's training (built once, stepped, checkpointed)."""

    def __init__(
        self,
        model,
        loss_fn,
        batches,
        cfg: TrainConfig,
        method: Method,
        bank: ConceptBank,
        prior_batches: BatchFn | None = None,
    ):
        self.model, self.loss_fn, self.batches, self.cfg, self.method, self.bank = (
            model,
            loss_fn,
            batches,
            cfg,
            method,
            bank,
        )
        self.prior_batches = prior_batches
        self.device = _device_of(model)
        self.groups: list[Group] = []
        self.step = 0
        self.losses: list[float] = []
        self.timings = {"upper_s": 0.0, "lower_s": 0.0, "forward_backward_s": 0.0}
        self.last_interference: tuple | None = None
        self.earlier: Composition | None = None  # the earlier concepts, toggled per step in the "mixed" context
        self._interference_acc = [0.0, 0.0]
        self.recorder: MomentRecorder | None = None  # records the concept loss's forward passes when set
        self.recorded_steps = 0

    # ---- setup -------------------------------------------------------------------------------
    def init_layer(self, spec: LayerSpec, own_sketch: Sketch | None, slot: int, gen: torch.Generator) -> LayerInit:
        """One layer's basis, constraint and penalty moments at the start of training, by the method's rules
        (``own_sketch``: the top eigenpairs of the concept's moment at this layer, for constrained methods).

        The linear algebra (one complement of the earlier bases, one eigendecomposition of the earlier
        concepts' moment in it) runs in float64 on the model's device."""
        cfg, method, bank, r, n = self.cfg, self.method, self.bank, self.cfg.rank, spec.in_features
        if method.basis == "frozen_slot":
            a, soft = frozen_slot(n, r, slot, int(bank.meta.get("ortho_seed", 0)))
            return LayerInit(a, soft=soft)
        if not method.constrained:
            return LayerInit(bs.kaiming_rows(n, r, gen))
        dev = self.device
        own = own_sketch.U, own_sketch.s, own_sketch.tail(method.tail)
        earlier = [c.layers[spec.name].A.to(dev, torch.float32) for c in bank.concepts]
        hard = [a for a, c in zip(earlier, bank.concepts, strict=True) if not c.layers[spec.name].soft]
        q = bs.span_basis(hard, n).to(dev)
        s_old, count = _earlier_moment(bank, spec.name, n, method.tail, dev)
        soft = n - cfg.reserve - q.shape[1] < r
        protect = method.protect and cfg.protect == "adaptive" and count and not soft
        if soft:
            # a full layer: no hard projection; steer the basis away from every earlier basis instead
            every = bs.span_basis(earlier, n).to(dev).double()
            s_old = s_old.plus(every, s_old.trace() / n or 1.0)
            q = None
        space = bs.free_space(s_old, q, r, cfg.protect_energy if protect else None, cfg.protect_margin, cfg.reserve)
        trace = s_old.trace()
        f_own = own[0].to(dev) * own[1].to(dev).clamp_min(0).sqrt()
        delta = 1e-2 * (trace / n if trace > 0 else max(float(f_own.pow(2).sum()) / n, 1e-12))
        a = bs.generalized_eigen_basis(f_own, space, r, delta)
        q_all = None if q is None else torch.cat([q, space.protected.float()], 1)
        old = _old_moment(space, count, cfg.penalty_rank, method.tail) if count and trace > 0 else None
        return LayerInit(a, q_all, old, own, soft, space.protection)

    def build_groups(self, pre: dict[str, torch.Tensor]) -> None:
        """Initial factors of every layer, stacked per (m, n) shape."""
        by_shape: dict[tuple, list[LayerSpec]] = {}
        for spec in self.bank.layers:
            by_shape.setdefault((spec.out_features, spec.in_features), []).append(spec)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        slot = sum(1 for c in self.bank.concepts if _basis_rule(c.method) == "frozen_slot")
        dev, r = self.device, self.cfg.rank
        sketched = self.method.constrained and self.method.basis != "frozen_slot"
        owns = sketches_from_moments(pre, max(self.cfg.sketch_rank, r), 1.0) if sketched else {}

        def stacked(mats: list, n: int) -> torch.Tensor | None:
            t = _pad_cols(mats, n)
            return None if t is None else t.to(dev)

        def moment(parts: list, n: int) -> Moment | None:
            if all(p is None for p in parts):
                return None
            u = stacked([None if p is None else p[0].float() for p in parts], n)
            k = u.shape[2]
            root = torch.zeros(len(parts), 1, k)
            tau = torch.zeros(len(parts))
            for i, p in enumerate(parts):
                if p is not None:
                    root[i, 0, : p[1].numel()] = p[1].float().clamp_min(0).sqrt()
                    tau[i] = p[2]
            return Moment(u, root.to(dev), tau.to(dev))

        for (m, n), specs in by_shape.items():
            inits = [self.init_layer(s, owns.get(s.name), slot, gen) for s in specs]
            g = Group(
                list(specs),
                torch.stack([i.A for i in inits]).to(dev),
                torch.zeros(len(specs), m, r, device=dev),
                stacked([i.q for i in inits], n),
                moment([i.old for i in inits], n),
                moment([i.own for i in inits], n),
                [i.soft for i in inits],
                torch.zeros(len(specs), device=dev),
                [i.protection for i in inits],
            )
            if self.method.basis == "learned":  # the bases that step, and so project every step
                g.q_free = bs.narrow_complement([None if i.q is None else i.q.to(dev) for i in inits], n)
            g.B.requires_grad_(True)
            g.opt_b = Adam(g.B)
            if self.method.basis in ("learned", "free"):
                g.A.requires_grad_(True)
                g.opt_a = ScaledMomentum(g.A) if self.method.basis == "learned" else Adam(g.A)
            self.groups.append(g)

    def attach(self, adapters: dict[str, AdapterLayer]) -> None:
        for g in self.groups:
            for i, spec in enumerate(g.specs):
                adapters[spec.name].train_view = (g.A, g.B, i)

    # ---- one step ----------------------------------------------------------------------------
    def penalty_terms(self, g: Group, detach_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(R_old, R_self) per layer of the group (G each): R_old is the mean over the prior and the earlier
        concepts of R(t->j), R_self = R(t->t), both with the sketches' tails."""
        b = g.B.detach() if detach_b else g.B
        r_old = g.old.energy(g.A, b) if g.old is not None else torch.zeros_like(g.lam)
        r_self = g.own.energy(g.A, b) if g.own is not None else torch.zeros_like(g.lam)
        return r_old, r_self

    def do_step(self) -> float:
        """One training step in its three phases: the loss's gradients, the upper level (the basis, with
        the interference penalty), the lower level (the up factor); then the dual variable."""
        t0 = time.perf_counter()
        loss = self._loss_and_gradients()
        t1 = time.perf_counter()
        with torch.no_grad():
            self._upper_step()
        t2 = time.perf_counter()
        with torch.no_grad():
            self._lower_step()
            self._dual_step()
        t3 = time.perf_counter()
        self.timings["forward_backward_s"] += t1 - t0
        self.timings["upper_s"] += t2 - t1
        self.timings["lower_s"] += t3 - t2
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def _loss_and_gradients(self) -> torch.Tensor:
        cfg = self.cfg
        if self.earlier is not None:  # "mixed" context: the earlier concepts on for a seeded half of the steps
            self.earlier.set_active(_coin(cfg.seed, self.step))
        for g in self.groups:
            g.B.grad = None
            if g.A.requires_grad:
                g.A.grad = None
        with _autocast(self.device, cfg.precision):
            with self.recorder if self.recorder is not None else contextlib.nullcontext():
                loss = self.loss_fn(self.model, self.batches(self.step))
            total = loss
            if cfg.prior_loss_weight > 0 and self.prior_batches is not None:
                total = loss + cfg.prior_loss_weight * self.loss_fn(self.model, self.prior_batches(self.step))
        if not torch.isfinite(total):
            raise _diverged(self, f"the loss is {float(total.detach())} at step {self.step + 1}", self.step == 0)
        total.backward()
        return loss

    def _penalty_gradients(self, g: Group) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Record R_old / R_self; return its gradient in A and the penalty's step size (adding the B part for
        `joint`), or None while lambda is 0.

        The step size is theta = lambda / (lambda + LAMBDA_HALF) times R_self / L, L the curvature bound
        2 ||B||_op^2 ||S_old||_op of R_old in A: a growing lambda moves the basis faster, up to the step that
        cannot overshoot, whatever the scale of the energies."""
        if g.old is None or g.own is None or not bool((g.lam > 0).any()):
            r_old, r_self = self.penalty_terms(g, detach_b=True)
            self._record_interference(g, r_old, r_self)
            return None
        with_b = self.method.penalty_on_up
        r_old, grad_old, b_old = g.old.energy_and_gradients(g.A, g.B.detach(), with_b)
        r_self, grad_self, b_self = g.own.energy_and_gradients(g.A, g.B.detach(), with_b)
        rel = self._record_interference(g, r_old, r_self)
        # d(R_old / R_self) = dR_old / R_self - (R_old / R_self^2) dR_self, per layer
        inv, ratio = (1 / (r_self + 1e-30)).view(-1, 1, 1), (rel / (r_self + 1e-30)).view(-1, 1, 1)
        grad_a = grad_old * inv - grad_self * ratio
        if with_b:
            g.B.grad = g.B.grad + g.lam.view(-1, 1, 1) * (b_old * inv - b_self * ratio)
        s_top = torch.maximum(g.old.root_s[:, 0, 0].pow(2), g.old.tau) if g.old.root_s.shape[2] else g.old.tau
        curvature = 2 * torch.linalg.matrix_norm(g.B.detach(), ord=2).pow(2) * s_top
        scale = _theta(g.lam) * r_self.detach() / curvature.clamp_min(1e-30)
        return grad_a, scale.view(-1, 1, 1)

    def _record_interference(self, g: Group, r_old: torch.Tensor, r_self: torch.Tensor) -> torch.Tensor:
        """Keep this step's R_old / R_self of the group (for the dual step and the report); return it."""
        rel = r_old / (r_self + 1e-30)
        g.last_rel = rel
        self._interference_acc[0] = self._interference_acc[0] + r_old.sum()
        self._interference_acc[1] = self._interference_acc[1] + r_self.sum()
        return rel

    def _upper_step(self) -> None:
        """The basis: learned bases take a Riemannian step (momentum on the loss's gradient, normalised per
        layer, plus a penalty step that grows with lambda); free bases an Adam step."""
        cfg, method = self.cfg, self.method
        self._interference_acc = [torch.zeros((), device=self.device), torch.zeros((), device=self.device)]
        for g in self.groups:
            pen = self._penalty_gradients(g) if method.constrained else None
            if method.basis == "learned" and g.A.grad is not None:
                self._riemannian_step(g, pen)
            elif method.basis == "free" and g.A.grad is not None:
                g.A.sub_(cfg.lr / math.sqrt(cfg.rank) * g.opt_a.direction(g.A.grad))
        if method.constrained:
            self.last_interference = tuple(self._interference_acc)

    def _lower_step(self) -> None:
        """The up factor: Adam at lr / sqrt(rank), so the size of a step of B A does not grow with the rank."""
        cfg = self.cfg
        lr = cfg.lr / math.sqrt(cfg.rank)
        for g in self.groups:
            if g.B.grad is None:
                continue
            if cfg.weight_decay:
                g.B.mul_(1 - lr * cfg.weight_decay)
            g.B.sub_(lr * g.opt_b.direction(g.B.grad))

    def _dual_step(self) -> None:
        """Projected dual ascent on R_old / R_self <= eps every K steps, lambda capped at lam_max."""
        cfg = self.cfg
        if not self.method.constrained or (self.step + 1) % cfg.dual_every:
            return
        for g in self.groups:
            if g.last_rel is not None and g.old is not None:
                # the constraint R_rel <= eps, scaled as R_rel / eps - 1 <= 0 so that eta_lambda means the same
                # for every budget
                violation = g.last_rel / max(cfg.budget, 1e-12) - 1.0
                g.lam.add_(cfg.dual_lr * violation.clamp(max=10.0)).clamp_(min=0, max=cfg.lam_max)

    def _riemannian_step(self, g: Group, pen: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """G P -> Stiefel tangent -> momentum direction (loss part), less theta times its part that would raise
        R_old / R_self, plus the penalty step -> P and tangent again -> step (at most MAX_TURN per layer) -> QR
        retraction. theta = lambda / (lambda + LAMBDA_HALF) grows from 0 to 1 with lambda.

        Each projection onto the complement of earlier bases costs O(r n min(K, n - K)). The gradient and the direction
        are projected every step (Adam's moments must only see feasible directions); the iterate, which the
        step keeps in the complement up to round-off, is re-projected every ``REPROJECT_EVERY`` steps and
        at the last one.
        """
        eta = self.cfg.rho * self.cfg.lr
        d = eta * g.opt_a.direction(bs.stiefel_tangent(bs.project_out(g.A.grad, g.q, g.q_free), g.A))
        if pen is not None:
            grad, size = pen
            normal = bs.stiefel_tangent(bs.project_out(grad, g.q, g.q_free), g.A)
            normal = normal / normal.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1)
            along = (d * normal).sum((1, 2), keepdim=True)  # < 0: the step A - d raises the ratio
            d = d - _theta(g.lam).view(-1, 1, 1) * along.clamp(max=0) * normal + size * grad
        d = bs.stiefel_tangent(bs.project_out(d, g.q, g.q_free), g.A)
        size = d.flatten(1).norm(dim=1).clamp_min(1e-30)
        d = d * (MAX_TURN / size).clamp(max=1.0).view(-1, 1, 1)
        new = g.A - d
        if (self.step + 1) % REPROJECT_EVERY == 0 or self.step + 1 >= self.cfg.steps:
            new = bs.project_out(new, g.q, g.q_free)
        g.A.copy_(bs.orthonormal_rows(new))

    def interference_now(self, fresh: bool = False) -> tuple[float, float]:
        """(sum_l R_old / sum_l R_self, mean lambda); from the last step unless ``fresh``."""
        if not self.method.constrained:
            return 0.0, 0.0
        lam = float(torch.cat([g.lam for g in self.groups]).mean())
        if self.last_interference is not None and not fresh:
            num, den = (float(x) for x in self.last_interference)
            return (num / den if den > 0 else 0.0), lam
        with torch.no_grad():
            num = den = 0.0
            for g in self.groups:
                r_old, r_self = self.penalty_terms(g, True)
                num += float(r_old.sum())
                den += float(r_self.sum())
        return (num / den if den > 0 else 0.0), lam

    # ---- checkpoint ----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for gi, g in enumerate(self.groups):
            out[f"g{gi}.A"] = g.A.detach().cpu().contiguous()
            out[f"g{gi}.B"] = g.B.detach().cpu().contiguous()
            out[f"g{gi}.lam"] = g.lam.cpu().contiguous()
            for tag, opt in (("a", g.opt_a), ("b", g.opt_b)):
                if opt is not None:
                    out[f"g{gi}.{tag}.m"] = opt.m.cpu().contiguous()
                    out[f"g{gi}.{tag}.v"] = opt.v.cpu().contiguous()
        out["losses"] = torch.tensor(self.losses, dtype=torch.float64)
        return out

    def finite(self) -> str | None:
        """None when every factor and the dual variables are finite, else the first layer where they are not."""
        for g in self.groups:
            for t in (g.A, g.B, g.lam.view(-1, 1, 1)):
                bad = ~torch.isfinite(t.detach()).flatten(1).all(1)
                if bool(bad.any()):
                    return g.specs[int(bad.nonzero()[0])].name
        return None

    def save_checkpoint(self, key: str, settings: dict | None = None) -> None:
        """Write the progress so far (atomically); a state with NaN or infinite values is never written."""
        path = self.cfg.checkpoint_path
        if not path or self.finite() is not None:
            return
        meta = {
            "format": "seqlora-checkpoint",
            "key": key,
            "step": str(self.step),
            "timings": json.dumps(self.timings),
            "settings": json.dumps(settings or {}),
        }
        atomic_write_bytes(Path(path), save(self.state_tensors(), metadata=meta))

    def try_resume(self, key: str, settings: dict | None = None) -> bool:
        """Continue from the checkpoint when there is one. ResumeMismatchError when it was made from other
        data or settings (it is left as it is: the user decides)."""
        path = self.cfg.checkpoint_path
        if not path or not Path(path).is_file():
            return False
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            t = load_file(path)
            if meta.get("format") != "seqlora-checkpoint":
                raise ValueError("not a SeqLoRA checkpoint")
            step = int(meta["step"])
        except Exception as e:  # a damaged checkpoint only costs the progress it held
            log.warning("checkpoint %s is unreadable (%s); starting the concept from step 0", path, e)
            return False
        if meta.get("key") != key:
            try:
                old = json.loads(meta.get("settings") or "{}")
            except ValueError:
                old = {}
            changes = settings_changes(old, settings or {}) if old else []
            what = "; ".join(changes[:6]) + ("; ..." if len(changes) > 6 else "") if changes else "other settings"
            raise ResumeMismatchError(
                f"the saved progress of {self.cfg.name!r} ({path}, step {step}) was made with other data or "
                f"settings ({what}). Run with the same data and settings to resume, or delete that file to "
                "start the concept over"
            )
        if not 0 <= step <= self.cfg.steps:
            raise ResumeMismatchError(
                f"the saved progress of {self.cfg.name!r} ({path}) is at step {step}, past the {self.cfg.steps} "
                "steps asked for; ask for at least that many steps, or delete that file to start over"
            )
        with torch.no_grad():
            for gi, g in enumerate(self.groups):
                g.A.copy_(t[f"g{gi}.A"])
                g.B.copy_(t[f"g{gi}.B"])
                g.lam.copy_(t[f"g{gi}.lam"])
                for tag, opt in (("a", g.opt_a), ("b", g.opt_b)):
                    if opt is not None:
                        opt.m.copy_(t[f"g{gi}.{tag}.m"])
                        opt.v.copy_(t[f"g{gi}.{tag}.v"])
                        opt.t = step
        self.step = step
        self.losses = t["losses"].tolist()
        self.timings.update(json.loads(meta.get("timings", "{}")))
        log.info("resumed %s at step %d from %s", self.cfg.name, self.step, path)
        return True


# ---------------------------------------------------------------------------------------------------


def train_concept(
    model: nn.Module,
    loss_fn: LossFn,
    batches: BatchFn,
    config: TrainConfig,
    bank: ConceptBank | None = None,
    prior_batches: BatchFn | None = None,
    callbacks: TrainCallbacks | None = None,
) -> ConceptBank:
    """Learn one concept and return a new bank with it appended (``bank`` itself is not changed).

    With ``config.checkpoint_path``, progress is saved there every ``checkpoint_every`` steps and on an
    interruption, and an existing checkpoint made from the same settings and data is resumed (one made from
    others is a :class:`ResumeMismatchError`). The checkpoint is kept: remove it with
    :func:`discard_checkpoint` once the returned bank is durably written. NaN or infinite losses or factors
    stop the training with :class:`TrainingDiverged`; the checkpoint then holds the last good state.

    ``prior_batches`` (trigger-free prompts) feed the base model's statistics (concept 0) the first time;
    without it the concept's own batches are used. With ``config.prior_loss_weight > 0`` their denoising
    loss is also added to every step's loss (DreamBooth-style prior preservation; needs ``prior_batches``).
    The model is left exactly as it was found.
    """
    method = config.validate()
    if config.prior_loss_weight > 0 and prior_batches is None:
        raise ValueError("prior_loss_weight > 0 needs prior_batches (trigger-free prompts); pass them or set it to 0")
    cb = callbacks or TrainCallbacks()
    bank = _resolve_layers(model, bank, config)
    specs = bank.layers
    context = config.context or method.context
    earlier_names = bank.names()
    weights = _weights_digest(model, specs)
    settings = config.resume_settings(bank.fingerprint, earlier_names, weights)
    key = config.resume_key(bank.fingerprint, earlier_names, weights)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    with contextlib.ExitStack() as restore:  # undone in reverse order, whatever happens
        restore.enter_context(prepared_for_training(model, config.gradient_checkpointing))
        run: _Run | None = None
        try:
            if not bank.prior:
                _phase(cb, "prior stats")
                t = time.perf_counter()
                moments = _run_stats(
                    model, specs, loss_fn, prior_batches or batches, config.stats_batches, config.precision
                )
                bank = bank.with_prior(sketches_from_moments(moments, config.sketch_rank, config.sketch_energy))
                timings["prior_stats_s"] = time.perf_counter() - t
            if "weight_norms" not in bank.meta:
                bank = dataclasses.replace(bank, meta={**bank.meta, "weight_norms": _weight_norms(model, specs)})
            if context in ("stacked", "mixed") and bank.concepts:
                earlier = restore.enter_context(compose(model, bank, None, "merged"))
            _phase(cb, "concept stats")
            t = time.perf_counter()
            pre = _run_stats(model, specs, loss_fn, batches, config.stats_batches, config.precision)
            timings["concept_stats_s"] = time.perf_counter() - t
            t = time.perf_counter()
            run = _Run(model, loss_fn, batches, config, method, bank, prior_batches)
            if context == "mixed" and bank.concepts:
                run.earlier = earlier
            run.build_groups(pre)
            timings["basis_init_s"] = time.perf_counter() - t
            adapters = inject(model, specs)
            restore.callback(remove, model, adapters)
            run.attach(adapters)
            run.try_resume(key, settings)
            _phase(cb, "train")
            t = time.perf_counter()
            # in the "mixed" context the final statistics come from the last steps that ran with the earlier
            # concepts on
            window = _final_stats_window(config, run.step, run.earlier is not None)
            recorder = MomentRecorder(model, specs) if window is not None else None
            _train_loop(run, cb, key, settings, recorder, window)
            timings["train_s"] = time.perf_counter() - t
            t = time.perf_counter()
            if recorder is not None and run.recorded_steps == config.stats_batches:
                final = recorder.moments()  # the last steps' forward passes, adapter active
                timings["final_stats_in_steps"] = float(run.recorded_steps)
            else:
                _phase(cb, "final stats")
                if run.earlier is not None:
                    run.earlier.set_active(True)
                final = _run_stats(model, specs, loss_fn, batches, config.stats_batches, config.precision)
            timings["final_stats_s"] = time.perf_counter() - t
            concept = _make_concept(run, final, config, method)
            concept.info["resume_key"] = key
        except BaseException as e:
            # keep the progress of an interruption or an error; never that of a diverged step
            if run is not None and run.step > 0 and not isinstance(e, (TrainingCancelled, TrainingDiverged)):
                with contextlib.suppress(Exception):
                    run.save_checkpoint(key, settings)
            raise
    timings.update({k: v for k, v in run.timings.items()})
    timings["total_s"] = time.perf_counter() - t_start
    timings["steps"] = float(config.steps)
    concept.timings = timings
    return bank.with_concept(concept)


@contextlib.contextmanager
def prepared_for_training(model: nn.Module, gradient_checkpointing: bool = False) -> Iterator[None]:
    """Freeze every parameter of ``model`` (adapters add their own trainable tensors) and, when asked and
    supported, turn on gradient checkpointing; on exit each parameter's ``requires_grad`` and the
    checkpointing are as they were."""
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    gc_on = bool(gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"))
    if gc_on:
        model.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if gc_on and hasattr(model, "disable_gradient_checkpointing"):
            model.disable_gradient_checkpointing()
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))


def _final_stats_window(config: TrainConfig, start: int, mixed: bool = False) -> frozenset[int] | None:
    """The steps whose forward passes feed the final statistics (the last ``stats_batches`` ones; in the
    "mixed" context the last ones that run with the earlier concepts on), or None for a separate pass after
    training: short trainings (the adapter still moves a lot in its last steps), runs resumed inside the
    window (the steps before the cut were not recorded) and mixed runs whose last ``FINAL_STATS_IN_STEPS_MIN
    * stats_batches`` steps hold too few such steps measure them in a pass of their own."""
    k = config.stats_batches
    if k < 1 or config.steps < FINAL_STATS_IN_STEPS_MIN * k:
        return None
    candidates = range(config.steps - 1, config.steps - 1 - FINAL_STATS_IN_STEPS_MIN * k, -1)
    steps = [s for s in candidates if not mixed or _coin(config.seed, s)][:k]
    if len(steps) < k or start > min(steps):
        return None
    return frozenset(steps)


def _train_loop(
    run: _Run,
    cb: TrainCallbacks,
    key: str,
    settings: dict | None = None,
    recorder: MomentRecorder | None = None,
    window: frozenset[int] | None = None,
) -> None:
    """Step until done, reporting every step, checkpointing every ``checkpoint_every`` steps; a stop
    request saves the checkpoint and raises :class:`TrainingCancelled`, a non-finite loss or factor raises
    :class:`TrainingDiverged` (the checkpoint keeps the last good state). The concept loss's forward passes
    of the steps in ``window`` also feed ``recorder`` (the final statistics)."""
    config = run.cfg
    while run.step < config.steps:
        if cb.should_stop is not None and cb.should_stop():
            run.save_checkpoint(key, settings)
            raise TrainingCancelled(run.step, config.checkpoint_path)
        run.recorder = recorder if window is not None and run.step in window else None
        if run.recorder is not None:
            run.recorded_steps += 1
        loss = run.do_step()
        bad_layer = run.finite()
        if not math.isfinite(loss) or bad_layer is not None:
            if math.isfinite(loss):
                what = f"the factors of layer {bad_layer!r} are not finite after step {run.step}"
            else:
                what = f"the loss is {loss} at step {run.step}"
            raise _diverged(run, what)
        if cb.on_step is not None:
            rel, lam = run.interference_now() if run.method.constrained else (0.0, 0.0)
            cb.on_step(StepInfo(run.step, config.steps, loss, rel, lam))
        if config.checkpoint_path and run.step % config.checkpoint_every == 0 and run.step < config.steps:
            run.save_checkpoint(key, settings)


def _diverged(run: _Run, what: str, before_update: bool = False) -> TrainingDiverged:
    """The error for a non-finite loss or factor: what happened, what was kept, what to change."""
    cfg = run.cfg
    kept = ""
    if cfg.checkpoint_path and Path(cfg.checkpoint_path).is_file():
        kept = f" The last good progress is kept in {cfg.checkpoint_path}."
    if before_update:
        fix = (
            "The data or the model give non-finite values before any update: check the images, and use an "
            "fp32 VAE or precision."
        )
    else:
        fix = f"Lower the learning rate (now {cfg.lr:g}) or the rank and train again (that starts the concept over)."
    return TrainingDiverged(f"training {cfg.name!r} diverged: {what}; nothing of it was saved.{kept} {fix}")


def _coin(seed: int, step: int) -> bool:
    """A fair coin that is a pure function of (seed, step), so a resumed run sees the same sequence."""
    return bool(hashlib.sha256(f"{seed}:{step}".encode()).digest()[0] & 1)


def _weight_norms(model: nn.Module, specs: list[LayerSpec]) -> dict[str, float]:
    """||W||_F of every adapted layer of the base model (what ||dW|| is compared with)."""
    with torch.no_grad():
        return {s.name: float(model.get_submodule(s.name).weight.float().norm()) for s in specs}


def _phase(cb: TrainCallbacks, name: str) -> None:
    log.debug("phase: %s", name)
    if cb.on_phase is not None:
        cb.on_phase(name)


def _make_concept(run: _Run, final: dict[str, torch.Tensor], cfg: TrainConfig, method: Method) -> Concept:
    """The trained concept: factors, sketches, protection per layer, and what the bank's report needs."""
    layers: dict[str, ConceptLayer] = {}
    moments = {name: m.cpu() for name, m in final.items()}
    sketches = sketches_from_moments(moments, cfg.sketch_rank, cfg.sketch_energy)
    for g in run.groups:
        for i, spec in enumerate(g.specs):
            moment = moments[spec.name]
            layers[spec.name] = ConceptLayer(
                g.A[i].detach().cpu().clone(),
                g.B[i].detach().cpu().clone(),
                sketches[spec.name],
                g.soft[i],
                moment.float() if method.keep_moment else None,
                g.protection[i],
            )
    soft_layers = [s.name for g in run.groups for s, soft in zip(g.specs, g.soft, strict=True) if soft]
    if soft_layers:
        log.warning(
            "concept %r: %d layers were full, orthogonality there is a penalty only (e.g. %s)",
            cfg.name,
            len(soft_layers),
            soft_layers[0],
        )
    rel, lam = run.interference_now(fresh=True)
    info = {
        **cfg.extra_info,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("checkpoint_path", "extra_info")},
        "soft_layers": soft_layers,
        "final_relative_interference": rel if math.isfinite(rel) else None,
        "final_lambda_mean": lam,
        **_measured_on_own_data(run.bank, layers, final),
    }
    if method.constrained and run.bank.concepts:
        info["budget"] = _budget_report(run, cfg, rel)
        if not info["budget"]["met"]:
            log.warning("concept %r: %s", cfg.name, budget_message(info["budget"]))
    return Concept(
        cfg.name, list(cfg.triggers), cfg.rank, cfg.method, layers, "trained", [float(x) for x in run.losses], {}, info
    )


def budget_message(budget: dict) -> str:
    """One line saying how far the interference budget was missed."""
    return (
        f"interference budget missed: mean R(new->earlier) / R(new->new) is {budget['achieved']:.3g} against "
        f"the budget {budget['budget']:.3g} ({budget['achieved'] / max(budget['budget'], 1e-30):.1f}x); "
        f"{budget['layers_over']} of {budget['layers']} layers are over it. Later concepts and the base "
        "prompts may be disturbed more than the budget allows (see the report)."
    )


def _budget_report(run: _Run, cfg: TrainConfig, rel: float) -> dict:
    """Whether R_old / R_self <= eps held at the end, overall and per layer."""
    over = layers = 0
    with torch.no_grad():
        for g in run.groups:
            if g.old is None:
                continue
            r_old, r_self = run.penalty_terms(g, True)
            per = r_old / (r_self + 1e-30)
            over += int((per > cfg.budget).sum())
            layers += per.numel()
    achieved = rel if math.isfinite(rel) else float("inf")
    return {
        "budget": cfg.budget,
        "achieved": achieved,
        "met": achieved <= cfg.budget,
        "layers_over": over,
        "layers": layers,
        "lambda_mean": run.interference_now()[1],
        "lambda_max": cfg.lam_max,
    }


def _measured_on_own_data(bank: ConceptBank, layers: dict[str, ConceptLayer], final: dict[str, torch.Tensor]) -> dict:
    """Exact energies on this concept's own activations (the final statistics pass): its own adapter's,
    R(t->t), and every earlier concept's, R(j->t), summed over layers; and ||dW|| / ||W|| per layer."""
    own = 0.0
    received = {c.name: 0.0 for c in bank.concepts}
    for name, cl in layers.items():
        moment = final[name].cpu().double()
        own += energy_of_gram(cl.B, dense_gram(cl.A, moment))
        for c in bank.concepts:
            other = c.layers[name]
            received[c.name] += energy_of_gram(other.B, dense_gram(other.A, moment))
    out: dict = {"self_energy": own, "received_interference": received}
    norms = bank.meta.get("weight_norms") or {}
    ratios = [
        float((cl.B.double() @ cl.A.double()).norm()) / norms[name] for name, cl in layers.items() if norms.get(name)
    ]
    if ratios:
        out["delta_norm_ratio"] = {"mean": sum(ratios) / len(ratios), "max": max(ratios)}
    return out
