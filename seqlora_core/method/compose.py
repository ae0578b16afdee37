"""Composition without fusion: W = W0 + sum_t s_t B_t A_t, merged into weights or as runtime bypass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .adapters import AdapterLayer, inject, remove
from .bank import ConceptBank
from .methods import Method, method_of


def resolve_strengths(bank: ConceptBank, selection: Mapping[str, float] | Sequence[str] | None) -> dict[str, float]:
    """Concept name -> strength; ``None`` selects every concept at 1.0. Unknown names are an error."""
    if selection is None:
        return {n: 1.0 for n in bank.names()}
    chosen = dict(selection) if isinstance(selection, Mapping) else {n: 1.0 for n in selection}
    for name in chosen:
        bank.concept(name)  # raises KeyError listing the bank's concepts
    return {n: float(s) for n, s in chosen.items()}


def stacked_factors(
    bank: ConceptBank, layer: str, strengths: Mapping[str, float]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The concatenated (A, s*B) of the selected concepts: one low-rank pair for the bypass path."""
    parts = [(bank.concept(n).layers[layer], s) for n, s in strengths.items() if s != 0]
    if not parts:
        return None
    a = torch.cat([cl.A.float() for cl, _ in parts], 0)
    b = torch.cat([cl.B.float() * s for cl, s in parts], 1)
    return a, b


def summed_delta(bank: ConceptBank, layer: str, strengths: Mapping[str, float]) -> torch.Tensor | None:
    """sum_t s_t B_t A_t at one layer (fp32) as one product of the stacked factors, or None."""
    pair = stacked_factors(bank, layer, strengths)
    return None if pair is None else pair[1] @ pair[0]


class Composition:
    """Concepts applied to a model. ``remove()`` puts the model back exactly as it was."""

    def __init__(self, model: nn.Module, mode: str):
        self.model = model
        self.mode = mode
        self._backups: dict[str, torch.Tensor] = {}
        self._wrappers: dict[str, AdapterLayer] = {}

    def set_active(self, on: bool) -> None:
        """Merged mode: put the composed weights in (``on``) or the original ones, exactly, without undoing
        the composition (the first call keeps a copy of the composed weights)."""
        if self.mode != "merged":
            raise ValueError("set_active toggles merged compositions only")
        if not hasattr(self, "_composed"):
            self._composed = {n: _target(self.model, n).weight.detach().clone() for n in self._backups}
            self._active = True
        if on == self._active:  # already in place: the training loop asks every step
            return
        with torch.no_grad():
            for name, w in (self._composed if on else self._backups).items():
                _target(self.model, name).weight.copy_(w)
        self._active = on

    def remove(self) -> None:
        with torch.no_grad():
            for name, w in self._backups.items():
                _target(self.model, name).weight.copy_(w)
        self._backups.clear()
        self.__dict__.pop("_composed", None)
        self.__dict__.pop("_active", None)
        remove(self.model, self._wrappers)
        self._wrappers.clear()

    def __enter__(self) -> Composition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _target(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.base if isinstance(module, AdapterLayer) else module


def apply_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor], comp: Composition) -> None:
    """Add dense deltas (m x n) into the named layers' weights, keeping exact backups in ``comp``."""
    with torch.no_grad():
        for name, d in deltas.items():
            layer = _target(model, name)
            w = layer.weight
            comp._backups.setdefault(name, w.detach().clone())
            w.copy_((w.float() + d.to(w.device).view(w.shape)).to(w.dtype))


def compose(
    model: nn.Module,
    bank: ConceptBank,
    selection: Mapping[str, float] | Sequence[str] | None = None,
    mode: str = "merged",
) -> Composition:
    """Apply any subset of concepts with strengths. No optimisation, no data.

    ``merged`` adds sum_t s_t dW_t into the weights (zero cost per step); ``bypass`` wraps the layers so
    that y = f(x) + sum_t s_t B_t (A_t x) (instant toggling; base weights untouched). Concepts of a method
    with its own ``fuse`` rule (the ``fusion`` baseline) are combined by that rule instead, in merged mode.
    """
    if mode not in ("merged", "bypass"):
        raise ValueError(f"mode: {mode!r}; use 'merged' or 'bypass'")
    bank.check_model(model)
    strengths = resolve_strengths(bank, selection)
    comp = Composition(model, mode)
    fusing = _fusing_method(bank, strengths)
    if fusing is not None:
        if mode != "merged":
            raise ValueError(f"concepts of the {fusing.name!r} baseline compose in merged mode only")
        apply_deltas(model, fusing.fuse(bank, strengths), comp)
        return comp
    if mode == "merged":
        deltas = {}
        for spec in bank.layers:
            d = summed_delta(bank, spec.name, strengths)
            if d is not None:
                deltas[spec.name] = d
        apply_deltas(model, deltas, comp)
        return comp
    comp._wrappers = inject(model, bank.layers)
    for spec in bank.layers:
        pair = stacked_factors(bank, spec.name, strengths)
        if pair is not None:
            comp._wrappers[spec.name].set_bypass(*pair)
    return comp


def _fusing_method(bank: ConceptBank, strengths: Mapping[str, float]) -> Method | None:
    """The method whose ``fuse`` rule composes the selection, or None for plain summation."""
    fusing = {m.name: m for n in strengths if (m := method_of(bank.concept(n).method)) and m.fuse is not None}
    if len(fusing) > 1:
        raise ValueError(f"concepts of {', '.join(map(repr, fusing))} fuse by different rules; compose them apart")
    return next(iter(fusing.values()), None)
