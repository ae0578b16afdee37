"""SeqLoRA: learn concepts one after another as LoRAs with learned orthogonal bases; compose by summation.

Main entry points: ``train_concept`` (one concept into a bank), ``ConceptBank`` (load/save), ``compose``
(merged or bypass), ``build_report`` (interference, forgetting bound, capacity).

Layers, each importing only the ones before it (``docs/architecture.md``): ``files`` -> ``method`` and
``baselines`` -> ``interop`` -> ``data`` -> ``backends`` -> ``toy`` -> ``apps``. Importing this package
needs torch, safetensors and Pillow only (never diffusers, transformers or ComfyUI).
"""

from .apps.heatmap import write_heatmap_png
from .method.bank import (
    BankError,
    BankFormatError,
    BankMismatchError,
    BankVersionError,
    Concept,
    ConceptBank,
    ConceptLayer,
    DuplicateConceptError,
)
from .method.compose import Composition, compose
from .method.methods import METHODS, get_method
from .method.report import build_report
from .method.targets import PRESETS, LayerSpec, find_targets
from .method.trainer import StepInfo, TrainCallbacks, TrainConfig, TrainingCancelled, train_concept

__all__ = [
    "METHODS",
    "PRESETS",
    "BankError",
    "BankFormatError",
    "BankMismatchError",
    "BankVersionError",
    "Composition",
    "Concept",
    "ConceptBank",
    "ConceptLayer",
    "DuplicateConceptError",
    "LayerSpec",
    "StepInfo",
    "TrainCallbacks",
    "TrainConfig",
    "TrainingCancelled",
    "build_report",
    "compose",
    "find_targets",
    "get_method",
    "train_concept",
    "write_heatmap_png",
]
__version__ = "0.1.0"
