"""Bank files inside ComfyUI: the ``models/seqlora`` folder and what the UI shows of a bank's header
(read by ``seqlora_core.method.bank.read_bank_header``)."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..seqlora_core import files
from ..seqlora_core.files import stem_for

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
    """Full path of a listed bank file; FileNotFoundError (with no absolute path) when it is not listed."""
    path = folder_paths.get_full_path(FOLDER, name) if name in list_banks() else None
    if path is None:
        raise FileNotFoundError(f"bank file {name!r} not found in models/{FOLDER}; choose one of the listed banks")
    return Path(path)


def autosave_dir() -> Path:
    d = bank_dir() / AUTOSAVE_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


def safe_name(name: str, what: str) -> str:
    """A file name for a name that is not a file name (a concept's): the name itself when it is a safe file
    name, else its safe characters and a short hash, so distinct names never share a file
    (``seqlora_core.files.stem_for``); ValueError when it is empty."""
    if not name.strip():
        raise ValueError(f"{what}: empty; give a name such as 'my_concepts'")
    return stem_for(name.strip()) + ".safetensors"


def keep_backup(path: Path) -> Path | None:
    """Copy an existing file to ``<file>.bak`` (``.bak2``, ... when taken) before it is replaced."""
    return files.keep_backup(path)


IMAGE_ROOTS = "seqlora_images"  # an extra_model_paths.yaml key: more folders the Image Folder node may read


def image_roots() -> list[Path]:
    """The folders training images may come from: ``input/seqlora`` and what extra_model_paths names."""
    roots = [Path(folder_paths.get_input_directory()) / FOLDER]
    if IMAGE_ROOTS in folder_paths.folder_names_and_paths:
        roots += [Path(p) for p in folder_paths.folder_names_and_paths[IMAGE_ROOTS][0]]
    return roots


def image_folder(text: str) -> Path:
    """The concept folder the Image Folder node's ``folder`` names: relative to ComfyUI's input folder (or
    absolute), and only inside :func:`image_roots`, links resolved (``seqlora_core.files.folder_inside``)."""
    shown = f"ComfyUI's input/{FOLDER} folder" + (
        f" or the {IMAGE_ROOTS} folders of extra_model_paths.yaml" if len(image_roots()) > 1 else ""
    )
    base = Path(folder_paths.get_input_directory())
    return files.folder_inside(text, base, image_roots(), "folder", shown, "image folder")


def public_message(message: str, path: Path, name: str) -> str:
    """``message`` with the absolute path of a bank file and its folders replaced by their names in
    models/seqlora (what an HTTP client may see)."""
    out = message.replace(str(path), name)
    for folder in folder_paths.get_folder_paths(FOLDER):
        out = out.replace(str(folder), f"models/{FOLDER}")
    return out
