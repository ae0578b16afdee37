"""Bank files inside ComfyUI: the ``models/seqlora`` folder and what the UI shows of a bank's header
(read by ``seqlora_core.method.bank.read_bank_header``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import folder_paths

FOLDER = "seqlora"
EXTENSIONS = {".safetensors"}
AUTOSAVE_DIR = ".autosave"  # checkpoints and finished results; not listed (suffixes are not .safetensors)


def register_folder() -> None:
    """Register ``models/seqlora`` (keeping paths an extra_model_paths.yaml gave) with our extensions."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))


def bank_dir() -> Path:
    """Where new banks and autosaves go: the first ``seqlora`` model folder."""
    return Path(folder_paths.get_folder_paths(FOLDER)[0])


def list_banks() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def bank_path(name: str) -> Path:
    """Full path of a listed bank file; FileNotFoundError names the folder when it is missing."""
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(
            f"bank file {name!r} not found in models/{FOLDER} ({', '.join(folder_paths.get_folder_paths(FOLDER))})"
        )
    return Path(path)


def autosave_dir() -> Path:
    d = bank_dir() / AUTOSAVE_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


def bank_summary(header: dict[str, Any]) -> dict[str, Any]:
    """What the loader's UI shows: concepts with triggers, rank, method and steps."""
    concepts = []
    for c in header.get("concepts", []):
        cfg = (c.get("info") or {}).get("config") or {}
        concepts.append(
            {
                "name": c["name"],
                "triggers": list(c.get("triggers", [])),
                "rank": c.get("rank"),
                "method": c.get("method"),
                "source": c.get("source", "trained"),
                "steps": cfg.get("steps"),
            }
        )
    return {
        "architecture": header.get("architecture"),
        "layer_naming": header.get("layer_naming"),
        "layers": len(header.get("layers", [])),
        "fingerprint": header.get("fingerprint"),
        "concepts": concepts,
    }


def safe_name(name: str, what: str) -> str:
    """A file name without folders or odd characters; ValueError when nothing usable is left."""
    base = os.path.basename(name.strip().replace("\\", "/"))
    if base.endswith(".safetensors"):
        base = base[: -len(".safetensors")]
    base = "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in base).strip(" .")
    if not base:
        raise ValueError(f"{what}: empty file name; give a name such as 'my_concepts'")
    return base + ".safetensors"


def keep_backup(path: Path) -> Path | None:
    """Copy an existing file to ``<file>.bak`` before it is replaced; returns the backup path."""
    if not path.is_file():
        return None
    bak = path.with_name(path.name + ".bak")
    shutil.copy2(path, bak)
    return bak
