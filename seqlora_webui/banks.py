"""The banks folder (``models/seqlora`` by default): listing, safe names, cheap summaries, cached loads."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

from ._core import BankFormatError, ConceptBank, capacity, header_summary, read_bank_header

SUFFIX = ".safetensors"
AUTOSAVE = ".autosave"  # training progress and job settings; hidden from the listing


def safe_stem(name: str, what: str) -> str:
    """A file stem without folders or odd characters; ValueError (naming `what`) when nothing is left."""
    base = os.path.basename(name.strip().replace("\\", "/"))
    if base.endswith(SUFFIX):
        base = base[: -len(SUFFIX)]
    base = "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in base).strip(" .")
    if not base:
        raise ValueError(f"{what}: empty name; give a name such as 'my_concepts'")
    return base


def read_header(path: Path) -> dict[str, Any]:
    """A bank's JSON header without its tensors, read and checked by the core's bank reader (one home for
    the format); BankFormatError for a file that is not a bank, naming the file but never its folder."""
    try:
        return read_bank_header(path)
    except BankFormatError as e:
        raise BankFormatError(str(e).replace(repr(str(path)), repr(path.name)).replace(str(path), path.name)) from None


def capacity_summary(bank: ConceptBank) -> dict[str, Any]:
    """How full the bank's layers are: the fullest layer's used/total rank and the layers that ran out."""
    cap = capacity(bank)
    if not cap:
        return {"fullest": 0.0, "fullest_layer": None, "full_layers": 0, "layers": 0}
    name, info = max(cap.items(), key=lambda kv: kv[1]["used"] / max(kv[1]["total"], 1))
    return {
        "fullest": info["used"] / max(info["total"], 1),
        "fullest_layer": name,
        "used": info["used"],
        "total": info["total"],
        "full_layers": sum(1 for v in cap.values() if v["soft"]),
        "layers": len(cap),
    }


class BankFolder:
    """Bank files under one root folder. Names are relative paths ending in ``.safetensors``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._cache: dict[Path, tuple[tuple[int, int], ConceptBank]] = {}
        self._lock = threading.Lock()

    # ---- names --------------------------------------------------------------------------------
    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if f.endswith(SUFFIX) and not f.startswith("."):
                    out.append((Path(dirpath) / f).relative_to(self.root).as_posix())
        return sorted(out)

    def resolve(self, name: str, must_exist: bool = True) -> Path:
        """The path of bank `name` inside the folder; ValueError for a name that leaves it."""
        text = (name or "").strip().replace("\\", "/")
        if not text:
            raise ValueError("bank: empty; choose a bank file or type a new name")
        if not text.endswith(SUFFIX):
            text += SUFFIX
        rel = Path(text)
        if rel.is_absolute() or any(part in ("..", "") or part.startswith(".") for part in rel.parts):
            raise ValueError(f"bank: {name!r} must be a file name inside the banks folder {self.root}")
        path = self.root / rel
        if must_exist and not path.is_file():
            have = ", ".join(self.list()) or "none yet"
            raise FileNotFoundError(f"bank {text!r} not found in {self.root} (banks there: {have})")
        return path

    def new_name(self, name: str) -> str:
        """A valid bank file name for a bank that may not exist yet."""
        return safe_stem(name, "bank") + SUFFIX

    def autosave_dir(self) -> Path:
        d = self.root / AUTOSAVE
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ---- reads --------------------------------------------------------------------------------
    def header(self, name: str) -> dict[str, Any]:
        return read_header(self.resolve(name))

    def summary(self, name: str) -> dict[str, Any]:
        path = self.resolve(name)
        st = path.stat()
        return {
            "bank": self._name_of(path),
            "size": st.st_size,
            "mtime": st.st_mtime,
            **header_summary(read_header(path)),
        }

    def load(self, name: str) -> ConceptBank:
        """The bank (cached while the file's size and mtime are unchanged)."""
        path = self.resolve(name)
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(path)
            if hit is not None and hit[0] == key:
                return hit[1]
        bank = ConceptBank.load(path)
        with self._lock:
            self._cache[path] = (key, bank)
        return bank

    # ---- writes -------------------------------------------------------------------------------
    def save(self, name: str, bank: ConceptBank) -> Path:
        """Write atomically; the previous version is kept as ``.autosave/<stem>.previous.safetensors``."""
        path = self.resolve(name, must_exist=False)
        if path.is_file():
            shutil.copy2(path, self.autosave_dir() / f"{path.stem}.previous{SUFFIX}")
        bank.save(path)
        with self._lock:
            self._cache.pop(path, None)
        return path

    def _name_of(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()
