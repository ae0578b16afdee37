"""The SeqLoRA nodes for ComfyUI (V1 API): thin wrappers over ``seqlora_core``.

Inputs, tooltips and outputs come from :mod:`.schema`. Layer names inside ComfyUI are the LDM module
names of ``diffusion_model``; a bank trained elsewhere with diffusers names is renamed on the fly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import folder_paths
import numpy as np
import torch
from PIL import Image

from ..seqlora_core.apps.heatmap import heatmap_image
from ..seqlora_core.data.captions import caption_line
from ..seqlora_core.data.dataset import ConceptDataset, folder_signature
from ..seqlora_core.files import FileLock, file_stem, keep_backup, numbered_path, stem_for
from ..seqlora_core.interop.families import check_bank_fits, family_from_comfy
from ..seqlora_core.interop.naming import STRUCTURE_META, structure_to_meta, unet_structure
from ..seqlora_core.method.bank import ConceptBank
from ..seqlora_core.method.report import build_report, report_text
from ..seqlora_core.method.selection import check_strengths, enabled_strengths, parse_selection
from ..seqlora_core.method.targets import find_targets
from ..seqlora_core.method.trainer import discard_checkpoint
from . import bankfiles, schema
from .autosave import KEY_FIELD, Autosave, bank_digest, reusable_concept, training_key
from .comfy_patches import apply_bypass, apply_merged, strip_concepts
from .prior import generate_prior, prior_prompts, prior_settings, with_prior
from .train_inputs import check_train_inputs
from .training import TEXTS, encode_data, send_status, train_in_comfy, trainable_family

log = logging.getLogger("seqlora")


# --------------------------------------------------------------------------- helpers


def _resolve_choices(key: str) -> list[str]:
    if key == "bank_files":
        return [schema.LINKED_BANK, *bankfiles.list_banks()]
    if key == "bank_files_only":
        return bankfiles.list_banks()
    raise KeyError(key)


def _configure(spec: schema.NodeSpec):
    """Class decorator: V1 attributes from a schema description."""

    def wrap(cls):
        cls.SPEC = spec
        cls.CATEGORY = schema.CATEGORY
        cls.DESCRIPTION = spec.description
        cls.RETURN_TYPES = tuple(o.type for o in spec.outputs)
        cls.RETURN_NAMES = tuple(o.name for o in spec.outputs)
        cls.OUTPUT_TOOLTIPS = tuple(o.tooltip for o in spec.outputs)
        cls.FUNCTION = "run"
        cls.OUTPUT_NODE = spec.output_node
        cls.INPUT_TYPES = classmethod(lambda c: schema.input_types(c.SPEC, _resolve_choices))
        return cls

    return wrap


def architecture(model) -> str:
    """The model family in the bank's vocabulary ("sd15", "sd2", "sd2v", "sdxl", or ComfyUI's class name
    lower-cased), by the rule of ``seqlora_core.interop.families``."""
    model_type = getattr(model.model, "model_type", None)
    v_prediction = getattr(model_type, "name", "") == "V_PREDICTION"
    return family_from_comfy(type(model.model.model_config).__name__, v_prediction)


def bank_for_model(bank: ConceptBank, model) -> ConceptBank:
    """The bank with LDM layer names, checked against `model`'s diffusion model (clear error if foreign)."""
    check_bank_fits(bank.architecture, architecture(model))
    if bank.layer_naming == "diffusers":
        from ..seqlora_core.interop.naming import diffusers_to_ldm_map

        bank = bank.renamed_layers(diffusers_to_ldm_map(model.model.model_config.unet_config), "ldm")
    bank.check_model(model.model.diffusion_model)
    return bank


def with_structure(bank: ConceptBank, model) -> ConceptBank:
    """The bank with the UNet block structure of `model` in its meta (kept if there), so export can name
    its layers in the convention of its family."""
    if STRUCTURE_META in bank.meta:
        return bank
    try:
        structure = unet_structure(model.model.model_config.unet_config)
    except (TypeError, ValueError, KeyError):
        return bank
    return dataclasses.replace(bank, meta={**bank.meta, STRUCTURE_META: structure_to_meta(structure)})


def _image_batch(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


# --------------------------------------------------------------------------- Train


@_configure(schema.TRAIN)
class SeqLoRATrainConcept:
    """Input checking (``train_inputs``), the autosave key and reuse (``autosave``), the base model's prior
    (``prior``), data preparation and training (``training``): this class only puts them in order."""

    def run(
        self,
        model,
        clip,
        vae,
        images,
        concept_name: str,
        trigger_words: str,
        method: str,
        rank: int,
        steps: int,
        learning_rate: float,
        interference_budget: float,
        target_preset: str,
        seed: int,
        batch_size: int,
        caption_template: str,
        bank: ConceptBank | None = None,
        captions: str | None = None,
        class_prompt: str = "",
        unique_id: str | None = None,
    ):
        base, removed = strip_concepts(model)
        arch, weighting = trainable_family(base)
        n_images = 0 if images is None else int(images.shape[0])
        request = check_train_inputs(
            n_images,
            concept_name,
            trigger_words,
            method,
            rank,
            steps,
            learning_rate,
            interference_budget,
            target_preset,
            seed,
            batch_size,
            caption_template,
            captions,
            arch,
        )
        if removed and (bank is None or not set(removed) <= set(bank.names())):
            log.warning(
                "SeqLoRA: the input model carried concepts %s that are not in the bank input; they are "
                "left out (connect their bank to keep them)",
                removed,
            )
        if bank is not None:
            bank = bank_for_model(bank, base)

        mm.load_models_gpu([base], force_full_load=True)
        diffusion = base.model.diffusion_model
        specs = bank.layers if bank is not None else find_targets(diffusion, target_preset)
        new_prior = bank is None or not bank.prior
        extra = {"weighting": weighting, "prior": prior_settings(class_prompt) if new_prior else None}
        key = training_key(request, images, diffusion, specs, bank, extra)
        if reusable_concept(bank, request.name, key):
            log.info("SeqLoRA: concept %r is already in the bank, trained from these inputs; reusing it", request.name)
            return self._outputs(base, bank, request.name, [])

        autosave = Autosave.of(request.name, key)
        request.config.checkpoint_path = str(autosave.checkpoint)
        request.config.extra_info = {KEY_FIELD: key}
        cached = autosave.finished()
        if cached is not None:
            return self._outputs(base, cached, request.name, [])

        notes = []
        restarted = autosave.drop_stale()
        if restarted:
            log.warning("SeqLoRA: %s", restarted)
            send_status(unique_id, restarted, "notice")
            notes.append(restarted)
        start = ConceptBank(specs, "ldm", arch) if bank is None else bank
        start = with_structure(start, base)
        data = encode_data(base, clip, vae, images, request)
        if new_prior:
            start = self._with_base_prior(base, clip, start, data, request, class_prompt, unique_id)
        new_bank = train_in_comfy(base, data, request, start, unique_id, weighting)
        autosave.store(new_bank)
        discard_checkpoint(request.config)  # only now: the finished bank is on disk
        return self._outputs(base, new_bank, request.name, notes)

    @staticmethod
    def _with_base_prior(base, clip, bank: ConceptBank, data, request, class_prompt: str, node_id) -> ConceptBank:
        """The bank with concept 0 measured while the base model generates (see ``prior``)."""
        cfg = request.config
        prompts = prior_prompts(class_prompt)

        def progress(done: int, total: int) -> None:
            send_status(node_id, f"base model's own images for the new bank: step {done}/{total}")

        sketches = generate_prior(
            base,
            lambda text: TEXTS.encode(clip, text),
            bank.layers,
            tuple(data.latents.shape[1:]),
            prompts,
            cfg.seed,
            cfg.sketch_rank,
            cfg.sketch_energy,
            progress,
        )
        return with_prior(bank, sketches)

    @staticmethod
    def _outputs(base, bank: ConceptBank, name: str, notes: list[str]):
        model = apply_merged(base, bank, {n: 1.0 for n in bank.names()})
        losses = [float(x) for x in bank.concept(name).loss_curve]
        return {"ui": {"text": notes}, "result": (bank, model, {"loss": losses})}


# --------------------------------------------------------------------------- dataset


def folder_summary(images: int, count: int, skipped: list[str]) -> str:
    """What the Image Folder node read, and every file it skipped with why (shown on the node)."""
    text = f"{images} image{'s' if images != 1 else ''}"
    if count != images:
        text += f" ({count} with repeats)"
    if skipped:
        text += f"; skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''}: " + "; ".join(skipped)
    return text


@_configure(schema.IMAGE_FOLDER)
class SeqLoRAImageFolder:
    """Reads only inside ``bankfiles.image_roots()`` (``input/seqlora`` and extra_model_paths' folders)."""

    @classmethod
    def IS_CHANGED(cls, folder: str, resolution: int) -> str:
        try:
            return f"{resolution}:{folder_signature(bankfiles.image_folder(folder), confine=True)}"
        except (OSError, ValueError):
            return "missing"

    def run(self, folder: str, resolution: int):
        root = bankfiles.image_folder(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped files are listed in the node's output instead
            ds = ConceptDataset.from_folder(
                root, trigger="concept", caption_template="", resolution=int(resolution), confine=True
            )
        idx = ds.weighted_indices()
        pixels = torch.stack([ds.pixels_u8[i].permute(1, 2, 0) for i in idx]).float() / 255.0
        lines = [caption_line(ds.given_captions[i]) for i in idx]
        skipped = [f"{p.relative_to(root).as_posix()}: {why}" for p, why in ds.skip_reasons.items()]
        if skipped:
            log.warning("SeqLoRA: skipped %d image(s) in %s: %s", len(skipped), root, "; ".join(skipped))
        text = folder_summary(len(ds.paths), len(idx), skipped)
        return {"ui": {"text": [text]}, "result": (pixels, "\n".join(lines), len(idx))}


# --------------------------------------------------------------------------- composition


def _load_bank_file(name: str) -> ConceptBank:
    return ConceptBank.load(bankfiles.bank_path(name))


@_configure(schema.LOADER)
class SeqLoRAMultiConceptLoader:
    @classmethod
    def IS_CHANGED(cls, bank_file: str, **_: Any) -> str:
        if bank_file == schema.LINKED_BANK:
            return ""
        try:
            return str(bankfiles.bank_path(bank_file).stat().st_mtime_ns)
        except OSError:
            return "missing"

    def run(
        self,
        model,
        bank_file: str,
        concepts: str,
        mode: str,
        bank: ConceptBank | None = None,
        unique_id: str | None = None,
    ):
        if bank_file == schema.LINKED_BANK:
            if bank is None:
                raise ValueError("bank: nothing connected; connect a bank or choose a bank file")
            chosen = bank
        else:
            chosen = _load_bank_file(bank_file)
        base, _ = strip_concepts(model)
        chosen = bank_for_model(chosen, base)
        items = parse_selection(concepts)
        available = chosen.names()
        unknown = [n for n, _, _ in items if n not in available]
        if unknown:
            raise ValueError(
                f"concepts: {', '.join(map(repr, unknown))} not in the bank; it has: "
                f"{', '.join(available) or 'no concepts'}"
            )
        check_strengths(items)
        strengths = enabled_strengths(items) if items else {n: 1.0 for n in available}
        out = apply_bypass(base, chosen, strengths) if mode == "bypass" else apply_merged(base, chosen, strengths)
        summary = [
            {"name": c.name, "triggers": c.triggers, "rank": c.rank, "method": c.method} for c in chosen.concepts
        ]
        return {"ui": {"seqlora_concepts": summary}, "result": (out,)}


# --------------------------------------------------------------------------- files


@_configure(schema.LOAD_BANK)
class SeqLoRALoadBank:
    @classmethod
    def IS_CHANGED(cls, bank_file: str) -> str:
        try:
            return str(bankfiles.bank_path(bank_file).stat().st_mtime_ns)
        except OSError:
            return "missing"

    def run(self, bank_file: str):
        return (_load_bank_file(bank_file),)


@_configure(schema.SAVE_BANK)
class SeqLoRASaveBank:
    """Never loses a file: a taken name gets the next number, or with overwrite a .bak copy is kept first."""

    def run(self, bank: ConceptBank, name: str, overwrite: bool):
        folder = bankfiles.bank_dir()
        stem = file_stem(name, "name")
        wanted = folder / f"{stem}.safetensors"
        with FileLock(wanted, "SeqLoRA Save Bank"):
            backup = keep_backup(wanted) if overwrite else None
            path = wanted if overwrite else numbered_path(folder, stem, ".safetensors")
            bank.save(path)
        folder_paths.filename_list_cache.pop(bankfiles.FOLDER, None)
        text = f"saved {path.name}: {len(bank.concepts)} concepts ({', '.join(bank.names()) or 'none'})"
        if backup is not None:
            text += f"; the previous file is kept as {backup.name}"
        elif path != wanted:
            text += f" ({wanted.name} exists; turn on overwrite to replace it)"
        return {"ui": {"text": [text]}, "result": (str(path),)}


@_configure(schema.EXPORT)
class SeqLoRAExportLoRA:
    def run(self, bank: ConceptBank, concept_name: str, filename: str, dtype: str, overwrite: bool):
        from ..seqlora_core.interop.bank_lora import export_concept, export_target

        if not bank.concepts:
            raise ValueError("bank: it has no concepts to export")
        name = concept_name.strip() or bank.names()[-1]
        concept = bank.concept(name)
        out_dir = Path(folder_paths.get_folder_paths("loras")[0])
        stem = file_stem(filename, "filename") if filename.strip() else stem_for(name)
        path = out_dir / f"{stem}.safetensors"
        with FileLock(path, "SeqLoRA Export LoRA"):
            replaced = export_target(path, overwrite, "filename")
            export_concept(bank, name, path, "kohya", dtype, overwrite=overwrite)
        folder_paths.filename_list_cache.pop("loras", None)
        text = f"exported {name!r} to models/loras/{path.name} (triggers: {', '.join(concept.triggers)})"
        if replaced is not None:
            text += "; the previous file is kept as a .bak copy"
        return {"ui": {"text": [text]}, "result": (str(path),)}


@_configure(schema.REMOVE)
class SeqLoRARemoveConcept:
    def run(self, bank: ConceptBank, concept_name: str):
        name = concept_name.strip()
        if not name:
            raise ValueError(f"concept_name: empty; give one of: {', '.join(bank.names()) or 'no concepts'}")
        return (bank.without(name),)


@_configure(schema.REPORT)
class SeqLoRAInterferenceReport:
    def run(self, bank: ConceptBank, delta: float):
        rep = build_report(bank, float(delta))
        img = heatmap_image(rep)
        text = report_text(rep)
        temp = Path(folder_paths.get_temp_directory())
        temp.mkdir(parents=True, exist_ok=True)
        fname = f"seqlora_report_{bank_digest(bank)[:12]}_{int(time.time() * 1000)}.png"
        img.save(temp / fname)
        ui = {"images": [{"filename": fname, "subfolder": "", "type": "temp"}], "text": [text]}
        return {"ui": ui, "result": (_image_batch(img), text)}


NODE_CLASS_MAPPINGS = {
    cls.SPEC.node_id: cls
    for cls in (
        SeqLoRATrainConcept,
        SeqLoRAImageFolder,
        SeqLoRAMultiConceptLoader,
        SeqLoRALoadBank,
        SeqLoRASaveBank,
        SeqLoRAExportLoRA,
        SeqLoRAInterferenceReport,
        SeqLoRARemoveConcept,
    )
}
NODE_DISPLAY_NAME_MAPPINGS = {k: v.SPEC.display_name for k, v in NODE_CLASS_MAPPINGS.items()}
