"""Train one concept into a bank on the web UI's loaded checkpoint, with progress, Interrupt and Resume.

The same function serves the tab's Train button (inside the host's ``wrap_gradio_gpu_call``) and the API
route (inside the host's queue lock in a worker thread), so a training never overlaps a generation.
Progress goes to ``shared.state`` (``job_count``/``job_no``/``textinfo``, what the host's progress bar
polls) and to :data:`STATUS` (what ``/seqlora/v1/train/status`` returns). Interrupt is the host's own
(``shared.state.interrupted``); the trainer then saves its progress, and Resume runs the saved job again.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import exports, host
from ._core import (
    METHODS,
    PRESETS,
    BankError,
    BankMismatchError,
    ConceptBank,
    ConceptDataset,
    StepInfo,
    TrainCallbacks,
    TrainConfig,
    TrainingCancelled,
    check_bank_fits,
    diffusers_to_ldm_map,
    discard_checkpoint,
    guess_structure,
    train_concept,
)
from .banks import BankFolder, safe_stem
from .ldm_loss import LatentData, make_batches, make_loss

log = logging.getLogger("seqlora")
LOSS_HISTORY = 400


class TrainInputError(ValueError):
    """A field of the training form is wrong; the message names it and the fix."""


@dataclass
class TrainRequest:
    """The training form. ``bank`` is a bank file in the banks folder (created when new)."""

    bank: str
    name: str
    triggers: str
    images: str
    caption_template: str = "a photo of {trigger}"
    method: str = "seqlora"
    rank: int = 4
    steps: int = 500
    lr: float = 1e-4
    budget: float = 0.05
    targets: str = "attn"
    resolution: int = 512
    batch_size: int = 1
    seed: int = 0
    checkpoint_every: int = 50

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRequest:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainInputError(f"unknown training field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        missing = [n for n in ("bank", "name", "triggers", "images") if not str(data.get(n, "")).strip()]
        if missing:
            raise TrainInputError(f"missing field(s): {', '.join(missing)}")
        return cls(**data)

    def trigger_list(self) -> list[str]:
        return [t.strip() for t in self.triggers.split(",") if t.strip()]

    def check(self, banks: BankFolder) -> tuple[Path, Path]:
        """(bank path, images folder); TrainInputError naming the field for anything wrong."""
        if not self.name.strip():
            raise TrainInputError("concept name: empty; give the concept a name such as 'my_dog'")
        if not self.trigger_list():
            raise TrainInputError("trigger words: empty; give the word(s) that call the concept, e.g. 'sks dog'")
        folder = Path(str(self.images).strip()).expanduser()
        if not str(self.images).strip():
            raise TrainInputError("image folder: empty; give the folder that holds the concept's images")
        if not folder.is_dir():
            raise TrainInputError(
                f"image folder: {str(folder)!r} does not exist or is not a folder; give the "
                "folder of the concept's images (png/jpg/webp/bmp, optional same-name .txt)"
            )
        if self.method not in METHODS:
            raise TrainInputError(f"method: unknown {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.targets not in PRESETS:
            raise TrainInputError(f"targets: unknown {self.targets!r}; choose one of {', '.join(PRESETS)}")
        if int(self.resolution) < 8 or int(self.resolution) % 8:
            raise TrainInputError(f"resolution: {self.resolution}; use a positive multiple of 8 (512 for SD1.x)")
        if int(self.batch_size) < 1:
            raise TrainInputError(f"batch size: {self.batch_size}; use at least 1")
        if int(self.checkpoint_every) < 1:
            raise TrainInputError(f"save progress every: {self.checkpoint_every}; use at least 1 step")
        try:
            path = banks.resolve(banks.new_name(self.bank) if "/" not in self.bank else self.bank, must_exist=False)
        except ValueError as e:
            raise TrainInputError(str(e)) from None
        try:
            self.config(Path("x"), "sd15").validate()  # ranges of rank, steps, lr, budget
        except ValueError as e:
            raise TrainInputError(str(e)) from None
        return path, folder

    def config(self, checkpoint: Path, arch: str, extra: dict[str, Any] | None = None) -> TrainConfig:
        try:
            return TrainConfig(
                name=self.name.strip(),
                triggers=self.trigger_list(),
                method=self.method,
                rank=int(self.rank),
                steps=int(self.steps),
                lr=float(self.lr),
                budget=float(self.budget),
                targets=self.targets,
                seed=int(self.seed),
                checkpoint_path=str(checkpoint),
                checkpoint_every=int(self.checkpoint_every),
                layer_naming="ldm",
                architecture=arch,
                extra_info=dict(extra or {}),
            )
        except (TypeError, ValueError) as e:
            raise TrainInputError(str(e)) from None


@dataclass
class TrainStatus:
    """The latest training, as ``/seqlora/v1/train/status`` reports it."""

    state: str = "idle"  # idle | running | interrupted | done | error
    bank: str = ""
    name: str = ""
    phase: str = ""
    step: int = 0
    total: int = 0
    loss: float | None = None
    interference: float | None = None
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    message: str = ""
    started: float | None = None
    finished: float | None = None

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["losses"] = [x if math.isfinite(x) else None for x in self.losses]
        return d


STATUS = TrainStatus()
_STATUS_LOCK = threading.Lock()


def _update(**kw: Any) -> None:
    with _STATUS_LOCK:
        for k, v in kw.items():
            setattr(STATUS, k, v)


def job_paths(banks: BankFolder, bank_path: Path, name: str) -> tuple[Path, Path]:
    """(progress checkpoint, saved job settings) of concept `name` for `bank_path`."""
    stem = f"{bank_path.stem}.{safe_stem(name, 'concept name')}"
    d = banks.autosave_dir()
    return d / f"{stem}.partial.safetensors", d / f"{stem}.job.json"


def saved_job(banks: BankFolder, bank: str = "", name: str = "") -> TrainRequest:
    """The settings of an interrupted training (of `bank`/`name`, or the most recent one)."""
    d = banks.autosave_dir()
    if bank.strip() and name.strip():
        path = banks.resolve(banks.new_name(bank), must_exist=False)
        candidates = [job_paths(banks, path, name)[1]]
    else:
        candidates = sorted(d.glob("*.job.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for job in candidates:
        if job.is_file():
            return TrainRequest.from_dict(json.loads(job.read_text(encoding="utf-8")))
    what = f"for concept {name!r} of {bank!r}" if bank.strip() and name.strip() else "in the banks folder"
    raise TrainInputError(f"no interrupted training {what} to resume; start one with Train")


# ---------------------------------------------------------------------------------------------- run


def _load_bank(banks: BankFolder, path: Path, name: str, model_arch: str, diffusion: Any) -> ConceptBank | None:
    if not path.is_file():
        return None
    try:
        bank = banks.load(path.relative_to(banks.root).as_posix())
    except BankError as e:
        raise TrainInputError(f"bank: {e}") from None
    if name in bank.names():
        raise TrainInputError(
            f"concept name: {name!r} is already in {path.name} (it has {', '.join(bank.names())}); choose another name"
        )
    try:
        check_bank_fits(bank.architecture, model_arch)
    except BankMismatchError:
        raise TrainInputError(
            f"bank: {path.name} was trained on {bank.architecture} but the loaded checkpoint is "
            f"{model_arch}; load the checkpoint the bank was trained on, or choose a new bank name"
        ) from None
    if bank.layer_naming == "diffusers":
        bank = bank.renamed_layers(diffusers_to_ldm_map(guess_structure(s.name for s in bank.layers)), "ldm")
    try:
        bank.check_model(diffusion)
    except BankMismatchError as e:
        raise TrainInputError(f"bank: {e}") from None
    return bank


def _progress_html(info: StepInfo | None, phase: str, losses: list[float]) -> str:
    # the newline keeps the host's progress bar from showing this HTML as its caption
    head = f"<b>SeqLoRA</b> {html.escape(STATUS.name)}: {html.escape(phase)}\n"
    if info is None:
        return f"<div class='seqlora-progress'>{head}</div>"
    line = f"{head}, step {info.step}/{info.total}, loss {info.loss:.5f}"
    if info.interference:
        line += f", interference {info.interference:.4f}"
    return f"<div class='seqlora-progress'>{line}{loss_chart_svg(losses)}</div>"


def loss_chart_svg(losses: list[float], width: int = 320, height: int = 60) -> str:
    """A small inline SVG line of the loss (smoothed), for the progress text."""
    vals = [x for x in losses if math.isfinite(x)]
    if len(vals) < 2:
        return ""
    k = max(1, len(vals) // 100)
    pts = [sum(vals[i : i + k]) / len(vals[i : i + k]) for i in range(0, len(vals), k)]
    lo, hi = min(pts), max(pts)
    span = (hi - lo) or 1.0
    coords = " ".join(
        f"{i * (width - 2) / (len(pts) - 1) + 1:.1f},{(1 - (v - lo) / span) * (height - 4) + 2:.1f}"
        for i, v in enumerate(pts)
    )
    return (
        f"<svg class='seqlora-loss' width='{width}' height='{height}' viewBox='0 0 {width} {height}'>"
        f"<polyline fill='none' stroke='currentColor' stroke-width='1.5' points='{coords}'/></svg>"
    )


def _encode(model: Any, ds: ConceptDataset) -> LatentData:
    """Latents of every image (repeats expanded) and the conditioning of its caption and prior caption."""
    order = ds.weighted_indices()
    first = model.first_stage_model
    vae_param = next(first.parameters())
    with torch.no_grad():
        lat = {}
        for i in sorted(set(order)):
            x = ds.pixels(i)[None].to(vae_param.device, vae_param.dtype)
            lat[i] = model.get_first_stage_encoding(model.encode_first_stage(x)).float().cpu()
        texts = sorted(set(ds.captions) | set(ds.prior_captions))
        cond = model.get_learned_conditioning(texts)
        if isinstance(cond, dict):  # SDXL-style conditioning is refused before this point
            raise TrainInputError("this checkpoint's conditioning is not a single tensor; SeqLoRA trains SD1.x/SD2.x")
        table = {t: cond[j : j + 1].detach().float().cpu() for j, t in enumerate(texts)}
    sizes = {tuple(v.shape) for v in lat.values()}
    if len(sizes) != 1:
        raise TrainInputError(f"images gave latents of different sizes {sorted(sizes)}; use one resolution")
    return LatentData(
        torch.cat([lat[i] for i in order]),
        torch.cat([table[ds.captions[i]] for i in order]),
        torch.cat([table[ds.prior_captions[i]] for i in order]),
    )


def run(req: TrainRequest, banks: BankFolder, lora_dir: Path | None = None) -> str:
    """Train `req` into its bank; returns a one-line result. Raises TrainInputError for bad input.

    Interrupt (``shared.state.interrupted``) returns a message and keeps the progress for Resume.
    """
    bank_path, folder = req.check(banks)
    name = req.name.strip()
    model = host.sd_model()
    reason = host.training_unsupported_reason(model)
    if reason:
        raise TrainInputError(reason)
    arch = host.architecture(model)
    diffusion = host.diffusion_model(model)
    bank = _load_bank(banks, bank_path, name, arch, diffusion)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = ConceptDataset.from_folder(
                folder, ", ".join(req.trigger_list()), req.caption_template, int(req.resolution)
            )
        except (OSError, ValueError) as e:
            raise TrainInputError(f"image folder: {e}") from None
    notes = [str(w.message) for w in caught]
    checkpoint, job_file = job_paths(banks, bank_path, name)
    info = getattr(model, "sd_checkpoint_info", None)
    extra = {
        "trained_in": host.host_name(),
        "checkpoint": getattr(info, "title", None),
        "images": len(ds.weighted_indices()),
    }
    cfg = req.config(checkpoint, arch, extra)

    state = host.state()
    _update(
        state="running",
        bank=bank_path.name,
        name=name,
        phase="encoding images",
        step=0,
        total=cfg.steps,
        loss=None,
        interference=None,
        losses=[],
        resumed_from=None,
        message="",
        started=time.time(),
        finished=None,
    )
    state.job = "seqlora-train"
    state.job_count = cfg.steps
    state.job_no = 0
    state.textinfo = _progress_html(None, "encoding images", [])
    job_file.write_text(json.dumps(dataclasses.asdict(req), indent=1), encoding="utf-8")

    host.clean_base_for_training()
    data = _encode(model, ds)
    n = data.latents.shape[0]
    shape = tuple(data.latents.shape[1:])
    steps_total = int(model.alphas_cumprod.shape[0])
    batches = make_batches(n, int(req.batch_size), int(req.seed), shape, steps_total)
    prior_batches = make_batches(n, int(req.batch_size), int(req.seed), shape, steps_total, prior=True)
    device = next(diffusion.parameters()).device
    loss_fn = make_loss(model, data, device)
    last = {"t": 0.0}

    def on_step(si: StepInfo) -> None:
        with _STATUS_LOCK:
            if STATUS.resumed_from is None and si.step > 1:
                STATUS.resumed_from = si.step - 1
            elif STATUS.resumed_from is None:
                STATUS.resumed_from = 0
            STATUS.step, STATUS.loss = si.step, si.loss
            STATUS.interference = si.interference
            STATUS.losses = (STATUS.losses + [si.loss])[-LOSS_HISTORY:]
        state.job_no = si.step
        now = time.monotonic()
        if now - last["t"] > 0.25 or si.step >= si.total:
            last["t"] = now
            state.textinfo = _progress_html(si, "training", STATUS.losses)

    def on_phase(phase: str) -> None:
        _update(phase=phase)
        state.textinfo = _progress_html(None, phase, STATUS.losses)

    callbacks = TrainCallbacks(on_step=on_step, should_stop=lambda: bool(state.interrupted), on_phase=on_phase)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            new_bank = train_concept(diffusion, loss_fn, batches, cfg, bank, prior_batches, callbacks)
    except TrainingCancelled as e:
        msg = (
            f"interrupted '{name}' at step {e.step}/{cfg.steps}; progress is saved, press Resume "
            "(or Train with the same settings) to continue"
        )
        _update(state="interrupted", phase="interrupted", message=msg, finished=time.time())
        return msg
    except Exception as e:
        _update(state="error", message=f"{type(e).__name__}: {e}", finished=time.time())
        raise
    banks.save(bank_path.relative_to(banks.root).as_posix(), new_bank)
    discard_checkpoint(cfg)  # only now: the bank holding the result is written
    job_file.unlink(missing_ok=True)
    if lora_dir is not None:
        sync_exports(banks, bank_path.relative_to(banks.root).as_posix(), lora_dir)
    c = new_bank.concept(name)
    took = c.timings.get("total_s", 0.0)
    resumed = f" (resumed at step {STATUS.resumed_from})" if STATUS.resumed_from else ""
    msg = (
        f"learned '{name}' ({c.method}, rank {c.rank}, {cfg.steps} steps{resumed}) in {took:.0f} s; "
        f"{bank_path.name} now holds {len(new_bank.concepts)} concept(s): {', '.join(new_bank.names())}"
    )
    if notes:
        msg += "; note: " + "; ".join(notes)
    _update(state="done", phase="done", message=msg, finished=time.time())
    return msg


def sync_exports(
    banks: BankFolder, bank_name: str, lora_dir: Path, concepts: list[str] | None = None, dtype: str | None = None
) -> list[exports.Exported]:
    """Bring the exported LoRA files of `bank_name` up to date and let the host's Lora network see them.

    `dtype`: the files' precision (default: the "SeqLoRA" setting, fp32 unless changed).
    """
    bank = banks.load(bank_name)
    dtype = dtype or host.export_dtype()
    done = exports.sync(bank_name, bank, lora_dir, concepts, dtype)
    if any(e.written for e in done):
        try:
            host.forget_applied_networks()
            host.refresh_networks()
        except RuntimeError as e:
            log.warning("SeqLoRA: %s", e)
    return done
