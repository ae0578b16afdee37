"""SeqLoRA: learn concepts one after another as LoRAs with learned orthogonal bases; compose by summation.

The method lives here and never imports ComfyUI. Main entry points:
``train_concept`` (one concept into a bank), ``ConceptBank`` (load/save), ``compose`` (merged or bypass),
``build_report`` (interference, forgetting bound, capacity).
"""

from .bank import (
    BankError,
    BankFormatError,
    BankMismatchError,
    BankVersionError,
    Concept,
    ConceptBank,
    ConceptLayer,
    DuplicateConceptError,
)
from .compose import Composition, compose
from .methods import METHODS, get_method
from .report import build_report, write_heatmap_png
from .targets import PRESETS, LayerSpec, find_targets
from .trainer import StepInfo, TrainCallbacks, TrainConfig, TrainingCancelled, train_concept

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
