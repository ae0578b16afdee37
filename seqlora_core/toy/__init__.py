"""The toy world: a tiny pretrained text-to-image base, new concepts for it, an identity metric, and the
protocol that evaluates banks with it (:mod:`.evaluation`). :mod:`.linear_world` is a second, linear
world where interference is exact.

Light imports (numpy, PIL) at package level; the diffusers model loads on first use:

    from seqlora_core.toy import load_toy_pipeline, write_concept_folder, identity_scores
"""

from __future__ import annotations

from typing import Any

from .concepts import (
    N_CONCEPTS,
    N_TRIGGERS,
    ConceptSpec,
    concept_examples,
    concept_spec,
    render_concept,
    trigger_word,
    trigger_words,
    write_concept_folder,
)
from .scenes import Scene, SceneObject, render_scene, scene_dataset, scene_prompt

_LAZY = {
    "load_toy_pipeline": "model",
    "WEIGHTS_DIR": "model",
    "identity_scores": "identity",
    "identity_probs": "identity",
    "identity_accuracy": "identity",
    "load_identity_classifier": "identity",
    "N_IDENTITY": "identity",
    "identity_report": "evaluation",
    "concept_id_of": "identity",
}

__all__ = [
    "N_CONCEPTS",
    "N_TRIGGERS",
    "ConceptSpec",
    "Scene",
    "SceneObject",
    "concept_examples",
    "concept_spec",
    "render_concept",
    "render_scene",
    "scene_dataset",
    "scene_prompt",
    "trigger_word",
    "trigger_words",
    "write_concept_folder",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
