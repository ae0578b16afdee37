"""Concepts as ordinary LoRA files for the host's built-in Lora network, kept in step with their banks.

Each concept of bank ``my_bank.safetensors`` is written to ``<lora dir>/seqlora/my_bank__<concept>.safetensors``
with a sidecar ``.json`` (the host's card metadata: activation text = trigger words, preferred weight,
sd version) that also records a digest of the concept's factors. A file is re-written only when that
digest, the dtype or the format changes, so an unchanged concept keeps its file (and the host its
cached weights); files of concepts no longer in the bank are removed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._core import ConceptBank, atomic_write_bytes, export_lora

SUBFOLDER = "seqlora"
FORMAT = 1  # bump when the exported file layout changes
SEP = "__"
SD_VERSIONS = {"sd15": "SD1", "sd2": "SD2", "sd2v": "SD2", "sdxl": "SDXL"}


@dataclass
class Exported:
    concept: str
    network: str  # the name in <lora:NAME:...> (the file stem)
    path: Path
    written: bool  # False when the existing file was already current


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def bank_prefix(bank_name: str) -> str:
    """File-name prefix of every network exported from `bank_name` (a bank file name or relative path)."""
    stem = bank_name[: -len(".safetensors")] if bank_name.endswith(".safetensors") else bank_name
    return _clean(stem.replace("/", "_")) + SEP


def network_name(bank_name: str, concept: str) -> str:
    """``<bank prefix><concept>``; a concept name that needs cleaning gets a short hash, so names stay unique."""
    clean = _clean(concept)
    if clean != concept:
        clean += "-" + hashlib.sha256(concept.encode()).hexdigest()[:6]
    return bank_prefix(bank_name) + clean


def concept_digest(bank: ConceptBank, concept: str) -> str:
    """A hash of what an exported file holds: the concept's factors, triggers and the bank's layers."""
    c = bank.concept(concept)
    h = hashlib.sha256(f"{bank.fingerprint}|{bank.layer_naming}|{bank.architecture}|{c.name}|{c.rank}".encode())
    h.update(json.dumps(c.triggers).encode())
    for spec in bank.layers:
        cl = c.layers[spec.name]
        h.update(spec.name.encode())
        h.update(cl.A.detach().float().contiguous().cpu().numpy().tobytes())
        h.update(cl.B.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def read_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_current(path: Path, digest: str, dtype: str) -> bool:
    if not path.is_file():
        return False
    mark = read_sidecar(path).get("seqlora") or {}
    return mark.get("digest") == digest and mark.get("dtype") == dtype and mark.get("format") == FORMAT


def _sidecar(
    old: dict[str, Any], bank_name: str, bank: ConceptBank, concept: str, digest: str, dtype: str
) -> dict[str, Any]:
    c = bank.concept(concept)
    data = dict(old)  # keep what the user edited in the host's card editor
    data["activation text"] = ", ".join(c.triggers)
    data.setdefault("preferred weight", 1.0)
    data["sd version"] = SD_VERSIONS.get(bank.architecture, "Unknown")
    data.setdefault("description", f"SeqLoRA concept '{c.name}' from bank {bank_name}")
    data["seqlora"] = {"bank": bank_name, "concept": c.name, "digest": digest, "dtype": dtype, "format": FORMAT}
    return data


def export_dir(lora_dir: str | Path) -> Path:
    return Path(lora_dir) / SUBFOLDER


def sync(
    bank_name: str,
    bank: ConceptBank,
    lora_dir: str | Path,
    concepts: Iterable[str] | None = None,
    dtype: str = "fp32",
    prune: bool = True,
) -> list[Exported]:
    """Make the exported files of `concepts` (default: all) current; remove those of dropped concepts.

    Returns one entry per requested concept, in the requested order.
    """
    out_dir = export_dir(lora_dir)
    wanted = list(bank.names() if concepts is None else concepts)
    for name in wanted:
        bank.concept(name)  # KeyError naming the bank's concepts
    result = []
    for name in wanted:
        net = network_name(bank_name, name)
        path = out_dir / f"{net}.safetensors"
        digest = concept_digest(bank, name)
        written = False
        if not is_current(path, digest, dtype):
            old = read_sidecar(path)
            export_lora(bank, name, path, net, dtype)
            side = _sidecar(old, bank_name, bank, name, digest, dtype)
            atomic_write_bytes(sidecar_path(path), json.dumps(side, indent=1).encode("utf-8"))
            written = True
        result.append(Exported(name, net, path, written))
    if prune:
        prune_dropped(bank_name, bank, lora_dir)
    return result


def owned_files(bank_name: str, lora_dir: str | Path) -> list[Path]:
    """Exported files whose sidecar says they came from `bank_name`."""
    out_dir = export_dir(lora_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in sorted(out_dir.glob(bank_prefix(bank_name) + "*.safetensors")):
        if (read_sidecar(path).get("seqlora") or {}).get("bank") == bank_name:
            found.append(path)
    return found


def prune_dropped(bank_name: str, bank: ConceptBank, lora_dir: str | Path) -> list[Path]:
    """Delete exported files (and sidecars) of concepts that are no longer in the bank."""
    keep = {network_name(bank_name, n) for n in bank.names()}
    removed = []
    for path in owned_files(bank_name, lora_dir):
        if path.stem not in keep:
            path.unlink(missing_ok=True)
            sidecar_path(path).unlink(missing_ok=True)
            removed.append(path)
    return removed
