"""Applying bank concepts to a ComfyUI ModelPatcher: merged (stock patches) or bypass (forward patches).

Merged: one LoRA patch per concept and layer through ``ModelPatcher.add_patches`` (ComfyUI merges
the sum into the weights at load time and restores them afterwards, per clone).
Bypass: each adapted layer's ``forward`` is object-patched with y = f(x) + sum_t s_t B_t (A_t x); the
layer and its weights stay in place, so other patches of the same weight (stock LoRAs) still apply.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from comfy.weight_adapter.lora import LoRAAdapter

from ..seqlora_core.method.adapters import lowrank
from ..seqlora_core.method.bank import ConceptBank
from ..seqlora_core.method.compose import stacked_factors
from ..seqlora_core.method.targets import LayerSpec

log = logging.getLogger("seqlora")
PREFIX = "diffusion_model."


class SeqLoraPatch(LoRAAdapter):
    """A stock LoRA patch (alpha = r, so dW = B A exactly) that remembers it came from a SeqLoRA bank."""

    def __init__(self, key: str, a: torch.Tensor, b: torch.Tensor, concept: str, fingerprint: str):
        super().__init__({key}, (b, a, float(a.shape[0]), None, None, None))
        self.concept = concept
        self.fingerprint = fingerprint


class SeqLoraBypassForward:
    """Replacement ``forward`` of one layer: the layer's own forward plus the stacked low-rank sum."""

    def __init__(
        self,
        module: torch.nn.Module,
        spec: LayerSpec,
        a: torch.Tensor,
        b: torch.Tensor,
        concepts: tuple[str, ...],
        fingerprint: str,
    ):
        self.module = module
        self.spec = spec
        self.a, self.b = a, b
        self.concepts = concepts
        self.fingerprint = fingerprint
        self._cache: tuple[torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def _factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._cache
        if c is None or c[0] != x.device or c[1] != x.dtype:
            c = (x.device, x.dtype, self.a.to(x.device, x.dtype), self.b.to(x.device, x.dtype))
            self._cache = c
        return c[2], c[3]

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = type(self.module).forward(self.module, x, *args, **kwargs)
        a, b = self._factors(x)
        return y + lowrank(x, a, b, self.spec, self.module)


def is_ours(patch: Any) -> bool:
    return isinstance(patch, (SeqLoraPatch, SeqLoraBypassForward))


def strip_concepts(model):
    """A clone of `model` without any SeqLoRA patches (merged or bypass); other patches stay.

    Returns (clone, names of the concepts that were removed).
    """
    mp = model.clone()
    removed: set[str] = set()
    changed = False
    for key in list(mp.patches):
        kept = []
        for entry in mp.patches[key]:
            if isinstance(entry[1], SeqLoraPatch):
                removed.add(entry[1].concept)
                changed = True
            else:
                kept.append(entry)
        if kept:
            mp.patches[key] = kept
        else:
            del mp.patches[key]
    for key in [k for k, v in mp.object_patches.items() if isinstance(v, SeqLoraBypassForward)]:
        removed.update(mp.object_patches[key].concepts)
        del mp.object_patches[key]
        changed = True
    if changed:
        import uuid

        mp.patches_uuid = uuid.uuid4()
    return mp, sorted(removed)


def apply_merged(model, bank: ConceptBank, strengths: Mapping[str, float]):
    """A clone of `model` with the concepts added as stock LoRA patches (strength per concept)."""
    mp = model.clone()
    sd_keys = set(mp.model.state_dict().keys())
    missing = [s.name for s in bank.layers if PREFIX + s.name + ".weight" not in sd_keys]
    if missing:
        raise ValueError(f"{len(missing)} bank layers are not in this model, e.g. {missing[0]!r}")
    for name, strength in strengths.items():
        if strength == 0:
            continue
        concept = bank.concept(name)
        patches = {}
        for spec in bank.layers:
            cl = concept.layers[spec.name]
            key = PREFIX + spec.name + ".weight"
            patches[key] = SeqLoraPatch(key, cl.A.float(), cl.B.float(), name, bank.fingerprint)
        mp.add_patches(patches, float(strength), 1.0)
    return mp


def apply_bypass(model, bank: ConceptBank, strengths: Mapping[str, float]):
    """A clone of `model` whose adapted layers run y = f(x) + sum_t s_t B_t (A_t x)."""
    mp = model.clone()
    active = {n: s for n, s in strengths.items() if s != 0}
    if not active:
        return mp
    diffusion = mp.model.diffusion_model
    for spec in bank.layers:
        pair = stacked_factors(bank, spec.name, active)
        if pair is None:
            continue
        module = diffusion.get_submodule(spec.name)
        fwd = SeqLoraBypassForward(module, spec, pair[0], pair[1], tuple(active), bank.fingerprint)
        mp.add_object_patch(f"{PREFIX}{spec.name}.forward", fwd)
    return mp
