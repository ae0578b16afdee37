"""The Train node's autosaves in ``models/seqlora/.autosave``.

A training is keyed by everything it is trained from (settings, captions, images, the adapted weights,
the earlier concepts and, for a new bank, how the base model's prior is built). A finished one is kept as
``<name>-<key>.bank`` (the newest few per concept name), so queuing an unchanged chain again reuses it;
an interrupted one leaves ``<name>-<key>.checkpoint``, from which the next run resumes. A run of the same
concept name with other inputs cannot resume it: it removes that checkpoint and says so
(:meth:`Autosave.drop_stale`), so nothing is left behind for good.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..seqlora_core.method.bank import ConceptBank
from . import bankfiles
from .train_inputs import TrainRequest

log = logging.getLogger("seqlora")
KEY_FIELD = "comfy_key"  # stored in Concept.info: what the concept was trained from (for idempotent re-runs)
AUTOSAVE_KEEP = 3  # finished trainings kept per concept name, so re-queuing an edited chain is cheap
CHECKPOINT_RE = r"-[0-9a-f]{20}\.checkpoint"


def tensor_digest(h: Any, t: torch.Tensor, stride: int = 1) -> None:
    """Feed a tensor's values (every ``stride``-th) into the hash ``h``."""
    flat = t.detach().reshape(-1)
    if stride > 1:
        flat = flat[::stride]
    h.update(flat.float().cpu().numpy().tobytes())


def bank_digest(bank: ConceptBank | None) -> str:
    """A hash of the bank's layers and every concept's factors (what a later concept is trained against)."""
    if bank is None:
        return "none"
    h = hashlib.sha256(bank.fingerprint.encode())
    for c in bank.concepts:
        h.update(c.name.encode())
        for spec in bank.layers:
            cl = c.layers[spec.name]
            tensor_digest(h, cl.A)
            tensor_digest(h, cl.B)
    return h.hexdigest()[:24]


def model_digest(diffusion: torch.nn.Module, specs: list) -> str:
    """A cheap signature of the (loaded, patched) weights of the adapted layers."""
    h = hashlib.sha256()
    for spec in specs:
        w = diffusion.get_submodule(spec.name).weight
        tensor_digest(h, w, stride=max(1, w.numel() // 2048))
    return h.hexdigest()[:24]


def training_key(
    request: TrainRequest,
    images: torch.Tensor,
    diffusion: torch.nn.Module,
    specs: list,
    bank: ConceptBank | None,
    extra: Any = None,
) -> str:
    """The key of a training: settings, captions, images, adapted weights, the earlier concepts and
    ``extra`` (JSON: the loss weighting, how the prior is built when the bank has none).

    A concept of the same name already in ``bank`` is not part of it (the key is what it was trained from).
    """
    cfg = request.config
    h = hashlib.sha256()
    h.update(json.dumps(dict(cfg.__dict__), sort_keys=True, default=str).encode())
    h.update(json.dumps([request.captions, request.batch_size, cfg.architecture, extra], default=str).encode())
    tensor_digest(h, images)
    h.update(model_digest(diffusion, specs).encode())
    earlier = bank.truncated_before(cfg.name) if bank is not None and cfg.name in bank.names() else bank
    h.update(bank_digest(earlier).encode())
    return h.hexdigest()[:20]


def reusable_concept(bank: ConceptBank | None, name: str, key: str) -> bool:
    """True when ``bank`` already holds concept ``name`` trained from the inputs of ``key``.

    ValueError when it holds a concept of that name trained from other inputs.
    """
    if bank is None or name not in bank.names():
        return False
    if bank.concept(name).info.get(KEY_FIELD) == key:
        return True
    raise ValueError(
        f"concept_name: {name!r} is already in the bank (trained from other inputs); choose another name, "
        f"or load the bank saved before it was added"
    )


@dataclass(frozen=True)
class Autosave:
    """The autosave files of one training."""

    name: str
    key: str
    done: Path  # the finished bank
    checkpoint: Path  # resumable progress

    @classmethod
    def of(cls, name: str, key: str) -> Autosave:
        stem = bankfiles.safe_name(name, "concept_name")[: -len(".safetensors")]
        folder = bankfiles.autosave_dir()
        return cls(name, key, folder / f"{stem}-{key}.bank", folder / f"{stem}-{key}.checkpoint")

    def finished(self) -> ConceptBank | None:
        """The bank saved when this training finished before, or None (an unreadable one only costs a retrain)."""
        if not self.done.is_file():
            return None
        try:
            cached = ConceptBank.load(self.done)
        except Exception as e:
            log.warning("SeqLoRA: ignoring unreadable autosave %s (%s)", self.done, e)
            return None
        if cached.names() and cached.names()[-1] == self.name:
            log.info("SeqLoRA: %r was trained from these inputs before; loaded %s", self.name, self.done.name)
            return cached
        return None

    def stale_checkpoints(self) -> list[Path]:
        """Checkpoints of this concept name left by a cancelled run with other inputs (settings, images,
        captions, earlier concepts): this training cannot resume them."""
        folder = self.checkpoint.parent
        if not folder.is_dir():
            return []
        stem = self.checkpoint.name.rsplit("-", 1)[0]
        pattern = re.compile(re.escape(stem) + CHECKPOINT_RE)
        return sorted(p for p in folder.iterdir() if p != self.checkpoint and pattern.fullmatch(p.name))

    def drop_stale(self) -> str | None:
        """Remove :meth:`stale_checkpoints`; a notice naming the step they reached, or None when there were none.

        Only called when this training is about to run, so the cancelled progress it replaces is given up
        for a reason the notice states.
        """
        stale = self.stale_checkpoints()
        if not stale:
            return None
        steps = [checkpoint_step(p) for p in stale]
        reached = max((s for s in steps if s is not None), default=None)
        for p in stale:
            p.unlink(missing_ok=True)
        if self.checkpoint.is_file():
            return None
        where = f" at step {reached}" if reached is not None else ""
        log.info("SeqLoRA: removed %d stale checkpoint(s) of %r: %s", len(stale), self.name, [p.name for p in stale])
        return (
            f"{self.name}: the inputs or settings changed since the run that was cancelled{where}, so it cannot "
            "resume; training restarts from step 1 (the old progress was removed)"
        )

    def store(self, bank: ConceptBank, keep: int = AUTOSAVE_KEEP) -> None:
        """Save the finished bank and keep only the ``keep`` newest finished trainings of this concept name."""
        bank.save(self.done)
        stem = self.done.name.rsplit("-", 1)[0]
        pattern = re.compile(re.escape(stem) + r"-[0-9a-f]{20}\.bank")
        older = sorted(
            (p for p in self.done.parent.iterdir() if p != self.done and pattern.fullmatch(p.name)),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for p in older[max(0, keep - 1) :]:
            p.unlink(missing_ok=True)


def checkpoint_step(path: Path) -> int | None:
    """The step a trainer checkpoint reached (from its header), or None when unreadable."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {}).get("step", ""))
    except Exception:
        return None
