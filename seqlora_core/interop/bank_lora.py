"""Bank <-> ordinary LoRA files: export one concept (kohya or PEFT), import a foreign LoRA as a frozen concept."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..files import keep_backup
from ..method.bank import BankError, Concept, ConceptBank, ConceptLayer, read_bank_header
from ..method.selection import check_trigger
from . import naming as nm
from .families import SD2, SD2V, SD15, SDXL, kohya_base_version
from .lora_read import read_lora_file
from .lora_write import save_kohya, save_peft

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def concept_factors(bank: ConceptBank, name: str, strength: float = 1.0) -> Factors:
    """Layer name -> (down A, up s*B) of one concept, in the bank's naming."""
    c = bank.concept(name)
    return {layer: (cl.A.float(), cl.B.float() * strength) for layer, cl in c.layers.items()}


# the layer naming kohya's sd-scripts writes for each family: diffusers module names for SD1.x/SD2.x,
# the original (LDM/SGM) module names for SDXL
CANONICAL_NAMING = {SD15: "diffusers", SD2: "diffusers", SD2V: "diffusers", SDXL: "ldm"}
_PRESET_OF = {SD15: nm.SD1, SD2: nm.SD1, SD2V: nm.SD1, SDXL: nm.SDXL}


def bank_structure(bank: ConceptBank) -> nm.UNetStructure | None:
    """The block structure of the UNet the bank was trained on: stored in its meta, else the family's
    standard layout (SD1.x/SD2.x or SDXL), else None."""
    stored = bank.meta.get(nm.STRUCTURE_META)
    if stored:
        return nm.structure_from_meta(stored)
    return _PRESET_OF.get(bank.architecture.lower())


def names_in(bank: ConceptBank, naming: str) -> dict[str, str] | None:
    """Bank layer name -> module name in ``naming`` ("diffusers" or "ldm"); None when the bank's names
    cannot be translated (no known structure, or a layer the structure does not name)."""
    if bank.layer_naming == naming:
        return {s.name: s.name for s in bank.layers}
    structure = bank_structure(bank)
    if structure is None or {bank.layer_naming, naming} != {"diffusers", "ldm"}:
        return None
    table = nm.diffusers_to_ldm_map(structure)
    if naming == "diffusers":
        table = {v: k for k, v in table.items()}
    names = {s.name: table.get(s.name) for s in bank.layers}
    return None if None in names.values() else names  # type: ignore[return-value]


def canonical_names(bank: ConceptBank) -> tuple[dict[str, str], str]:
    """(bank layer name -> module name in the file, that naming) for a kohya export: the naming sd-scripts
    uses for the bank's family, whatever naming the bank was trained in; the bank's own names for
    families without one (or when they cannot be translated, with a warning)."""
    want = CANONICAL_NAMING.get(bank.architecture.lower())
    own = {s.name: s.name for s in bank.layers}
    if want is None:
        return own, bank.layer_naming
    names = names_in(bank, want)
    if names is None:
        warnings.warn(
            f"the bank's {bank.layer_naming} layer names could not be translated to {want} names for "
            f"{bank.architecture} (unknown UNet structure); the LoRA keeps the bank's names, which ComfyUI, "
            "A1111 and Forge still read",
            stacklevel=3,
        )
        return own, bank.layer_naming
    return names, want


def export_target(path: str | os.PathLike, overwrite: bool = False, field: str = "out") -> Path | None:
    """Check that a LoRA may be written to ``path``; returns the backup to make first (None: a new file).

    A SeqLoRA bank is never replaced (whatever ``overwrite`` says); another existing file only with
    ``overwrite``, and then a numbered ``.bak`` copy is kept. FileExistsError names ``field`` and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{field}: {path.name!r} is a folder; give a file name ending in .safetensors")
    if not path.exists():
        return None
    try:
        read_bank_header(path)
        is_bank = True
    except (BankError, OSError):
        is_bank = False
    if is_bank:
        raise FileExistsError(
            f"{field}: {path.name} is a SeqLoRA bank; exporting there would replace it. Give another file name"
        )
    if not overwrite:
        raise FileExistsError(
            f"{field}: {path.name} already exists; choose another file name, or allow overwriting "
            "(the old file is then kept as a .bak copy)"
        )
    return path


def export_concept(
    bank: ConceptBank,
    name: str,
    path: str | os.PathLike,
    fmt: str = "kohya",
    dtype: str = "fp16",
    overwrite: bool = False,
) -> Path:
    """Write one concept as an ordinary LoRA file: kohya (`lora_unet_*`, alpha = r) or diffusers/PEFT.

    kohya keys follow kohya's sd-scripts for the bank's family, whatever naming the bank was trained in:
    diffusers module names for SD1.x/SD2.x (`lora_unet_down_blocks_0_attentions_0_...`), LDM names for
    SDXL (`lora_unet_input_blocks_4_1_...`); so ComfyUI, A1111, Forge, sd-scripts and diffusers'
    `load_lora_weights` all read them. PEFT files use diffusers names. Trigger words go in
    `ss_tag_frequency` and `modelspec.trigger_phrase`; SeqLoRA facts in `seqlora_*`. An existing file is
    refused unless ``overwrite`` (then kept as a numbered ``.bak``); a bank file is always refused
    (:func:`export_target`).
    """
    if fmt not in ("kohya", "peft"):
        raise ValueError(f"format: {fmt!r}; use 'kohya' (ComfyUI, A1111, Forge) or 'peft' (diffusers)")
    c = bank.concept(name)
    if fmt == "peft":
        names = names_in(bank, "diffusers")
        if names is None:
            raise ValueError(
                f"format: PEFT files need diffusers layer names and this bank's {bank.layer_naming} names cannot "
                "be translated (unknown UNet structure); export it as kohya"
            )
        naming = "diffusers"
    else:
        names, naming = canonical_names(bank)
    replaced = export_target(path, overwrite)
    factors = concept_factors(bank, name)
    for layer, (a, b) in factors.items():
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError(f"concept {name!r} holds NaN or infinite values at layer {layer!r}; it cannot be exported")
    factors = {names[k]: v for k, v in factors.items() if float(v[1].abs().max()) > 0}
    if not factors:
        raise ValueError(f"concept {name!r} changes no layer (all its factors are zero); there is nothing to export")
    if replaced is not None:
        keep_backup(replaced)
    kernels = {names[s.name]: s.kernel for s in bank.layers if s.kind == "conv2d"}
    extra = {
        "seqlora_concept": c.name,
        "seqlora_method": c.method,
        "seqlora_rank": str(c.rank),
        "seqlora_bank_fingerprint": bank.fingerprint,
        "seqlora_concept_index": str(bank.index(name)),
        "seqlora_architecture": bank.architecture,
        "seqlora_layer_naming": naming,
    }
    base_version = kohya_base_version(bank.architecture)
    save = save_kohya if fmt == "kohya" else save_peft
    return save(path, factors, kernels, c.triggers, c.name, base_version, extra, dtype=dtype, concept_name=c.name)


def _orthonormal_factors(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same dW = up @ down with orthonormal rows in down (QR), so capacity accounting holds."""
    q, r = torch.linalg.qr(down.double().T)
    return q.T.float().contiguous(), (up.double() @ r.T).float().contiguous()


def import_lora(
    bank: ConceptBank,
    path: str | os.PathLike,
    name: str,
    triggers: list[str] | None = None,
    structure: Any = None,
) -> ConceptBank:
    """A new bank with a foreign LoRA file added as a frozen concept.

    Later concepts are trained orthogonal to its basis. Layers the file has and the bank does not are
    reported (they cannot be composed through this bank); bank layers the file lacks get a zero adapter.
    """
    path = Path(path)
    names = [s.name for s in bank.layers]
    if bank.layer_naming in ("diffusers", "ldm"):
        factors, meta, file_triggers = read_lora_file(path, bank.layer_naming, structure or nm.guess_structure(names))
    else:
        factors, meta, file_triggers = read_lora_file(path, "diffusers", module_names=names)
    extra = sorted(set(factors) - set(names))
    if extra:
        warnings.warn(
            f"{path.name}: {len(extra)} LoRA modules are not adapted by this bank (e.g. {extra[0]!r}); "
            "they are left out of the imported concept",
            stacklevel=2,
        )
    hit = [n for n in names if n in factors]
    if not hit:
        raise ValueError(f"{path.name}: none of its modules is a layer of this bank (first: {sorted(factors)[:3]})")
    rank = max(int(factors[n][0].shape[0]) for n in hit)
    layers = {}
    for spec in bank.layers:
        if spec.name in factors:
            down, up = factors[spec.name]
            down = down.reshape(down.shape[0], -1)
            up = up.reshape(up.shape[0], -1)
            if down.shape[1] != spec.in_features or up.shape[0] != spec.out_features:
                raise ValueError(
                    f"{path.name}: layer {spec.name!r} is {up.shape[0]}x{down.shape[1]} in the file but "
                    f"{spec.out_features}x{spec.in_features} in the bank; the LoRA is for another base model"
                )
            a, b = _orthonormal_factors(down, up)
        else:
            a, b = torch.zeros(1, spec.in_features), torch.zeros(spec.out_features, 1)
        layers[spec.name] = ConceptLayer(a, b)
    if triggers is None:
        triggers = []
        for t in file_triggers:
            try:
                triggers.append(check_trigger(t))
            except ValueError as e:
                warnings.warn(f"{path.name}: a trigger in the file's metadata is left out ({e})", stacklevel=2)
    concept = Concept(
        name,
        list(triggers),
        rank,
        "imported",
        layers,
        "imported",
        info={"file": path.name, "layers_in_file": len(factors), "layers_used": len(hit)},
    )
    return bank.with_concept(concept)
