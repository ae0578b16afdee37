"""Everything this package takes from ``seqlora_core``, in one place.

The web UI extension imports the library only through this module, so a reorganised core is repointed
here alone. Everything here needs torch, safetensors, numpy and Pillow only (never diffusers or
transformers), which is what Automatic1111's and Forge's venvs are sure to have.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from seqlora_core import (
    METHODS,
    PRESETS,
    BankError,
    BankFormatError,
    BankMismatchError,
    ConceptBank,
    LayerSpec,
    StepInfo,
    TrainCallbacks,
    TrainConfig,
    TrainingCancelled,
    build_report,
    train_concept,
)
from seqlora_core.apps.heatmap import heatmap_image
from seqlora_core.data.dataset import ConceptDataset
from seqlora_core.files import atomic_write_bytes
from seqlora_core.interop.bank_lora import export_concept, import_lora
from seqlora_core.interop.families import check_bank_fits
from seqlora_core.interop.naming import diffusers_to_ldm_map, guess_structure
from seqlora_core.method.bank import header_summary, read_bank_header
from seqlora_core.method.report import capacity
from seqlora_core.method.selection import format_selection as format_concepts
from seqlora_core.method.selection import parse_selection as parse_concepts
from seqlora_core.method.targets import layer_spec, resolve_patterns
from seqlora_core.method.trainer import discard_checkpoint

__all__ = [
    "METHODS",
    "PRESETS",
    "BankError",
    "BankFormatError",
    "BankMismatchError",
    "ConceptBank",
    "ConceptDataset",
    "LayerSpec",
    "StepInfo",
    "TrainCallbacks",
    "TrainConfig",
    "TrainingCancelled",
    "atomic_write_bytes",
    "build_report",
    "capacity",
    "check_bank_fits",
    "diffusers_to_ldm_map",
    "discard_checkpoint",
    "export_concept",
    "export_lora",
    "format_concepts",
    "guess_structure",
    "header_summary",
    "heatmap_image",
    "import_lora",
    "layer_spec",
    "parse_concepts",
    "read_bank_header",
    "resolve_patterns",
    "train_concept",
]


def export_lora(bank: ConceptBank, name: str, path: str | Path, title: str, dtype: str = "fp32") -> Path:
    """Export one concept as a kohya LoRA whose alias (``ss_output_name``, ``modelspec.title``) is `title`.

    The core's exporter names the file's alias after the concept; the web UI needs the alias to be the
    file's stem, so that tags, card clicks and pasted infotexts (which the host rewrites to the alias)
    all use one name. The header is rewritten; tensor bytes are untouched. These files are the extension's
    own (rewritten whenever their concept changes), so an existing one is replaced atomically, without the
    ``.bak`` copy the core keeps of a user's file.
    """
    path = Path(path)
    fresh = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.export.safetensors")
    try:
        export_concept(bank, name, fresh, "kohya", dtype)
        raw = fresh.read_bytes()
    finally:
        fresh.unlink(missing_ok=True)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.setdefault("__metadata__", {})
    meta["ss_output_name"] = title
    meta["modelspec.title"] = title
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    atomic_write_bytes(path, len(text).to_bytes(8, "little") + text + raw[8 + n :])
    return path
