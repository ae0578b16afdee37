"""What the tab and the API both do: bank listings, export, import, report, and training in the background.

Every function returns plain data or raises an exception whose message is meant for the user
(:func:`user_error` tells those apart from bugs).
"""

from __future__ import annotations

import io
import logging
import threading
import uuid
from pathlib import Path
from typing import Any

from . import exports, host, training
from ._core import (
    BankError,
    ConceptBank,
    build_report,
    heatmap_image,
    import_lora,
)
from .banks import BankFolder, capacity_summary
from .shapes import find_layers
from .training import TrainInputError, TrainRequest

log = logging.getLogger("seqlora")
USER_ERRORS = (TrainInputError, BankError, ValueError, KeyError, FileNotFoundError, FileExistsError, RuntimeError)


def user_error(e: BaseException) -> str | None:
    """The message to show for an expected error (bad input, missing file, wrong model); None for a bug."""
    if isinstance(e, KeyError):
        return str(e.args[0]) if e.args else "not found"
    if isinstance(e, USER_ERRORS):
        return str(e)
    return None


def folder() -> BankFolder:
    return BankFolder(host.banks_dir())


def list_banks() -> dict[str, Any]:
    banks = folder()
    out = []
    for name in banks.list():
        try:
            s = banks.summary(name)
            names = [c["name"] for c in s["concepts"]]
            out.append({"bank": name, "architecture": s["architecture"], "concepts": names})
        except (BankError, OSError, ValueError) as e:
            out.append({"bank": name, "error": str(e)})
    return {"dir": str(banks.root), "banks": out}


def bank_info(name: str) -> dict[str, Any]:
    banks = folder()
    info = banks.summary(name)
    bank = banks.load(name)
    info["capacity"] = capacity_summary(bank)
    lora_dir = host.lora_dir()
    for c in info["concepts"]:
        net = exports.network_name(info["bank"], c["name"])
        path = exports.export_dir(lora_dir) / f"{net}.safetensors"
        c["network"] = net
        c["exported"] = exports.is_current(
            path,
            exports.concept_digest(bank, c["name"]),
            exports.read_sidecar(path).get("seqlora", {}).get("dtype", ""),
        )
    return info


def export(name: str, concepts: list[str] | None = None, dtype: str | None = None) -> list[dict[str, Any]]:
    if dtype is not None and dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"dtype: {dtype!r}; use fp32, fp16 or bf16")
    banks = folder()
    done = training.sync_exports(
        banks, banks.resolve(name).relative_to(banks.root).as_posix(), host.lora_dir(), concepts or None, dtype
    )
    return [{"concept": e.concept, "network": e.network, "path": str(e.path), "written": e.written} for e in done]


def resolve_lora(path_or_name: str) -> Path:
    """A LoRA file given as a path or as a name in the host's Lora folder; only .safetensors (no pickle)."""
    text = (path_or_name or "").strip()
    if not text:
        raise ValueError("LoRA file: empty; give a .safetensors file in the Lora folder or its full path")
    p = Path(text).expanduser()
    if not p.is_absolute():
        base = host.lora_dir()
        p = base / text
        if not p.suffix:
            p = p.with_suffix(".safetensors")
    if p.suffix.lower() != ".safetensors":
        raise ValueError(
            f"LoRA file: {p.name} is not a .safetensors file; only safetensors LoRAs are read "
            "(pickled .pt/.ckpt files are never loaded)"
        )
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file {str(p)!r} not found")
    return p


def import_into(bank_name: str, lora: str, name: str, triggers: str = "") -> str:
    """Add a foreign LoRA to a bank as a frozen concept (a new bank takes its layers from the loaded model)."""
    banks = folder()
    path = banks.resolve(banks.new_name(bank_name) if "/" not in bank_name else bank_name, must_exist=False)
    rel = path.relative_to(banks.root).as_posix()
    concept = name.strip()
    if not concept:
        raise ValueError("concept name: empty; give the imported concept a name")
    src = resolve_lora(lora)
    trig = [t.strip() for t in triggers.split(",") if t.strip()] or None
    if path.is_file():
        bank = banks.load(rel)
    else:
        model = host.sd_model()
        bank = ConceptBank(find_layers(host.diffusion_model(model), "attn"), "ldm", host.architecture(model))
    try:
        new = import_lora(bank, src, concept, trig)
    except (OSError, ValueError) as e:
        raise ValueError(f"LoRA file {src.name}: {e}") from None
    banks.save(rel, new)
    training.sync_exports(banks, rel, host.lora_dir())
    c = new.concept(concept)
    used = c.info.get("layers_used")
    return (
        f"imported {src.name} into {rel} as frozen concept '{concept}' ({used} of {len(new.layers)} layers, "
        f"rank {c.rank}); later concepts are trained orthogonal to it"
    )


def report(name: str) -> dict[str, Any]:
    return build_report(folder().load(name))


def report_png(name: str) -> bytes:
    buf = io.BytesIO()
    heatmap_image(report(name)).save(buf, format="PNG")
    return buf.getvalue()


def report_pairs(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """Both directions for every pair: how much a's change reaches b's activations, and b's reaches a's."""
    names = rep["concepts"]
    mat = rep["interference"]
    out = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            out.append({"a": names[i], "b": names[j], "a_on_b": mat[i][j], "b_on_a": mat[j][i]})
    return out


# ------------------------------------------------------------------------------------ background training

_worker: threading.Thread | None = None
_worker_lock = threading.Lock()


def start_training(req: TrainRequest) -> dict[str, Any]:
    """Check the request now (so bad input is answered at once), then train in a worker thread that takes
    the host's queue lock (so the job never overlaps a generation)."""
    global _worker
    banks = folder()
    bank_path, _ = req.check(banks)
    if bank_path.is_file():
        try:
            banks.load(bank_path.relative_to(banks.root).as_posix())
        except BankError as e:
            raise TrainInputError(f"bank: {e}") from None
    with _worker_lock:
        if _worker is not None and _worker.is_alive():
            raise RuntimeError(f"a training is running ({training.STATUS.name!r}); wait for it or interrupt it")
        job = f"seqlora-{uuid.uuid4().hex[:8]}"
        training._update(
            state="queued",
            bank=bank_path.name,
            name=req.name.strip(),
            message="waiting for the queue",
            step=0,
            total=int(req.steps),
            losses=[],
            resumed_from=None,
        )
        _worker = threading.Thread(target=_train_in_queue, args=(req, job), name=job, daemon=True)
        _worker.start()
    return {"job": job, **training.STATUS.as_dict()}


def _train_in_queue(req: TrainRequest, job: str) -> None:
    state = host.state()
    with host.queue_lock():
        state.begin(job=job)
        try:
            training.run(req, folder(), host.lora_dir())
        except Exception as e:
            msg = user_error(e)
            if msg is None:
                log.exception("SeqLoRA training failed")
                msg = f"{type(e).__name__}: {e}"
            training._update(state="error", message=msg)
        finally:
            state.interrupted = False
            state.end()
