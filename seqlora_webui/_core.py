"""Everything this package takes from ``seqlora_core``, in one place.

The web UI extension imports the method only through this module, so a reorganised core is repointed
here alone. The selection grammar (``name:strength, !off:strength``) is kept as a private copy because
its home (``nodes/schema.py``) is the ComfyUI side of the repository, which a web UI process must not
import; ``tests/test_webui_selection.py`` checks that the two copies agree.
"""

from __future__ import annotations

import json
from pathlib import Path

from seqlora_core import (
    METHODS,
    PRESETS,
    BankError,
    BankFormatError,
    BankMismatchError,
    BankVersionError,
    ConceptBank,
    DuplicateConceptError,
    LayerSpec,
    StepInfo,
    TrainCallbacks,
    TrainConfig,
    TrainingCancelled,
    build_report,
    train_concept,
)
from seqlora_core.dataset import ConceptDataset, accepted_types, make_prior_caption
from seqlora_core.files import atomic_write_bytes
from seqlora_core.lora_io import ARCH_TO_BASE_VERSION, export_concept, import_lora
from seqlora_core.naming import diffusers_to_ldm_map, guess_structure
from seqlora_core.report import capacity, heatmap_image
from seqlora_core.targets import layer_spec, resolve_patterns

__all__ = [
    "ARCH_TO_BASE_VERSION",
    "METHODS",
    "PRESETS",
    "BankError",
    "BankFormatError",
    "BankMismatchError",
    "BankVersionError",
    "ConceptBank",
    "ConceptDataset",
    "LayerSpec",
    "DuplicateConceptError",
    "StepInfo",
    "TrainCallbacks",
    "TrainConfig",
    "TrainingCancelled",
    "accepted_types",
    "atomic_write_bytes",
    "build_report",
    "capacity",
    "diffusers_to_ldm_map",
    "export_concept",
    "export_lora",
    "format_concepts",
    "guess_structure",
    "heatmap_image",
    "import_lora",
    "layer_spec",
    "make_prior_caption",
    "parse_concepts",
    "resolve_patterns",
    "train_concept",
]


def export_lora(bank: ConceptBank, name: str, path: str | Path, title: str, dtype: str = "fp32") -> Path:
    """Export one concept as a kohya LoRA whose alias (``ss_output_name``, ``modelspec.title``) is `title`.

    The core's exporter names the file's alias after the concept; the web UI needs the alias to be the
    file's stem, so that tags, card clicks and pasted infotexts (which the host rewrites to the alias)
    all use one name. The header is rewritten in place; tensor bytes are untouched.
    """
    path = Path(export_concept(bank, name, path, "kohya", dtype))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.setdefault("__metadata__", {})
    meta["ss_output_name"] = title
    meta["modelspec.title"] = title
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    atomic_write_bytes(path, len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return path


def parse_concepts(text: str) -> list[tuple[str, float, bool]]:
    """Parse 'name:strength, !off:0.5, plain' -> [(name, strength, enabled)] (same grammar as ComfyUI's loader).

    A missing strength is 1.0; '!' marks a concept listed but switched off. Raises ValueError on a bad
    strength or an empty name.
    """
    out: list[tuple[str, float, bool]] = []
    for raw in text.replace("\n", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        enabled = not item.startswith("!")
        item = item.lstrip("!").strip()
        name, sep, strength = item.rpartition(":")
        if not sep:
            name, strength = item, "1"
        name = name.strip()
        if not name:
            raise ValueError(f"concepts: empty concept name in {raw.strip()!r}; write 'name:strength'")
        try:
            value = float(strength)
        except ValueError:
            raise ValueError(f"concepts: strength {strength.strip()!r} of {name!r} is not a number") from None
        out.append((name, value, enabled))
    return out


def format_concepts(items: list[tuple[str, float, bool]]) -> str:
    """Inverse of :func:`parse_concepts`."""
    return ", ".join(f"{'' if on else '!'}{name}:{s:g}" for name, s, on in items)
