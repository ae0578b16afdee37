"""The training methods: SeqLoRA and the baselines it is compared with, in one engine.

A :class:`Method` says how its concepts are trained (basis rule, constraint, context) and composed (plain
summation, or the method's own ``fuse``). The trainer and the composer read these fields; they never test
a method's name. Concepts whose method is not listed here (an imported LoRA: ``"imported"``) are plain
low-rank pairs: free basis, composed by summation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..baselines.fusion import fused_deltas

if TYPE_CHECKING:
    from .bank import ConceptBank

# (bank, {concept: strength}) -> {layer: dW}: a composition rule other than summation
Fuse = Callable[["ConceptBank", Mapping[str, float]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """What a method trains and how.

    basis: "learned" (Stiefel, data-driven init, orthogonal to earlier bases), "frozen_init" (the same
    data-driven init, then frozen: InfLoRA-like), "free" (a plain LoRA down factor, kaiming init, Adam), or
    "frozen_slot" (Orthogonal Adaptation's fixed disjoint slots).
    protect: the feasible set also excludes the earlier concepts' and the prior's top-energy input
    subspace (activation-space protection), unless the training config turns it off.
    tail: how activation sketches stand for the full moment ("mean": with the energy the top eigenpairs
    leave out, spread evenly; "none": the top eigenpairs only, as version 1 did).
    """

    name: str
    basis: str
    constrained: bool  # orthogonality projection + interference penalty with dual ascent
    penalty_on_up: bool  # single-level: the penalty's gradient also reaches B (the `joint` ablation)
    context: str  # default training context: "stacked" (earlier concepts active), "base" or "mixed" (both, per step)
    keep_moment: bool = False  # store each layer's full input moment (the fusion baseline needs it)
    fuse: Fuse | None = None  # composed by this rule (merged mode only) instead of summation
    protect: bool = False
    tail: str = "mean"
    summary: str = ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "seqlora",
            "learned",
            True,
            False,
            "mixed",
            protect=True,
            summary="bilevel: learned basis orthogonal to earlier bases and away from their activations "
            "(upper), up factor fits the concept (lower)",
        ),
        Method(
            "seqlora_v1",
            "learned",
            True,
            False,
            "stacked",
            tail="none",
            summary="ablation: version 1's constraint only (orthogonal bases; no activation-space protection, "
            "sketches without their tail)",
        ),
        Method(
            "frozen_a",
            "frozen_init",
            True,
            False,
            "mixed",
            protect=True,
            summary="ablation: SeqLoRA's data-driven, protected basis, then frozen; only B trained (InfLoRA-like)",
        ),
        Method("lora", "free", False, False, "base", summary="a standard LoRA per concept on the base model"),
        Method(
            "sequential",
            "free",
            False,
            False,
            "stacked",
            summary="a standard LoRA trained on top of the earlier concepts",
        ),
        Method(
            "ortho_frozen",
            "frozen_slot",
            False,
            False,
            "base",
            summary="Orthogonal Adaptation: frozen disjoint random basis slots, only B trained",
        ),
        Method(
            "joint",
            "learned",
            True,
            True,
            "mixed",
            protect=True,
            summary="SeqLoRA's constraint and penalty, single-level (penalty gradient on B too)",
        ),
        Method(
            "fusion",
            "free",
            False,
            False,
            "base",
            keep_moment=True,
            fuse=fused_deltas,
            summary="independent LoRAs fused by least squares at composition (Mix-of-Show-style)",
        ),
    )
}


def get_method(name: str) -> Method:
    """The method called ``name``; a clear error lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: unknown {name!r}; choose one of {', '.join(METHODS)}") from None


def method_of(name: str) -> Method | None:
    """The method a concept's ``method`` field names, or None (an imported LoRA)."""
    return METHODS.get(name)
