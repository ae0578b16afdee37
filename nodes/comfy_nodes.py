"""The SeqLoRA nodes for ComfyUI (V1 API): thin wrappers over ``seqlora_core``.

Inputs, tooltips and outputs come from :mod:`.schema`. Layer names inside ComfyUI are the LDM module
names of ``diffusion_model``; a bank trained elsewhere with diffusers names is renamed on the fly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import comfy.utils
import folder_paths
import numpy as np
import torch
from PIL import Image

from ..seqlora_core.bank import BankMismatchError, ConceptBank
from ..seqlora_core.dataset import ConceptDataset, make_caption, make_prior_caption
from ..seqlora_core.report import build_report, heatmap_image
from ..seqlora_core.trainer import StepInfo, TrainCallbacks, TrainConfig, TrainingCancelled, train_concept
from . import bankfiles, schema
from .comfy_loss import DenoiseData, make_batches, make_loss
from .comfy_patches import apply_bypass, apply_merged, strip_concepts

log = logging.getLogger("seqlora")
KEY_FIELD = "comfy_key"  # stored in Concept.info: what the concept was trained from (for idempotent re-runs)
LOSS_EVENT = "seqlora.loss"
AUTOSAVE_KEEP = 3  # finished trainings kept per concept name, so re-queuing an edited chain is cheap


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


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def _send(event: str, data: dict[str, Any]) -> None:
    srv = _server()
    if srv is not None:
        srv.send_sync(event, data, getattr(srv, "client_id", None))


_FAMILIES = {"SD15": "sd15", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl"}


def architecture(model) -> str:
    """The model family in the bank's vocabulary ("sd15", "sd2", "sdxl", or ComfyUI's class name lower-cased)."""
    name = type(model.model.model_config).__name__
    return _FAMILIES.get(name, name.lower())


def bank_for_model(bank: ConceptBank, model) -> ConceptBank:
    """The bank with LDM layer names, checked against `model`'s diffusion model (clear error if foreign)."""
    arch = architecture(model)
    if bank.architecture.lower() not in ("unknown", "", arch):
        raise BankMismatchError(
            f"this bank was trained on {bank.architecture} but the model is {arch}; load the base model the "
            f"bank was trained on, or start a new bank (leave the bank input empty)"
        )
    if bank.layer_naming == "diffusers":
        from ..seqlora_core.naming import diffusers_to_ldm_map

        bank = bank.renamed_layers(diffusers_to_ldm_map(model.model.model_config.unet_config), "ldm")
    bank.check_model(model.model.diffusion_model)
    return bank


def _tensor_digest(h: Any, t: torch.Tensor, stride: int = 1) -> None:
    flat = t.detach().reshape(-1)
    if stride > 1:
        flat = flat[::stride]
    h.update(flat.float().cpu().numpy().tobytes())


def bank_digest(bank: ConceptBank | None) -> str:
    """A hash of the bank's layers and every concept's factors (what a later concept is trained against)."""
    if bank is None:
        return "none"
    h = hashlib.sha256(bank.fingerprint.encode())
    for c in bank.concepts:
        h.update(c.name.encode())
        for spec in bank.layers:
            cl = c.layers[spec.name]
            _tensor_digest(h, cl.A)
            _tensor_digest(h, cl.B)
    return h.hexdigest()[:24]


def model_digest(diffusion: torch.nn.Module, specs: list) -> str:
    """A cheap signature of the (loaded, patched) weights of the adapted layers."""
    h = hashlib.sha256()
    for spec in specs:
        w = diffusion.get_submodule(spec.name).weight
        _tensor_digest(h, w, stride=max(1, w.numel() // 2048))
    return h.hexdigest()[:24]


def _make_autograd_safe(module: torch.nn.Module) -> None:
    """Replace inference tensors (ComfyUI runs prompts under inference_mode) by normal ones."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.detach().clone()


def _prune_autosaves(latest: Path, keep: int) -> None:
    """Keep the `keep` newest finished autosaves of this concept name (``<name>-<key>.bank``)."""
    stem = latest.name.rsplit("-", 1)[0]
    pattern = re.compile(re.escape(stem) + r"-[0-9a-f]{20}\.bank")
    older = sorted(
        (p for p in latest.parent.iterdir() if p != latest and pattern.fullmatch(p.name)),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for p in older[max(0, keep - 1) :]:
        p.unlink(missing_ok=True)


def _image_batch(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


# --------------------------------------------------------------------------- Train


@_configure(schema.TRAIN)
class SeqLoRATrainConcept:
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
        unique_id: str | None = None,
    ):
        name = concept_name.strip()
        if not name:
            raise ValueError("concept_name: empty; give the concept a unique name such as 'my_dog'")
        phrase = trigger_words.strip()
        if not phrase:
            raise ValueError("trigger_words: empty; give the word(s) that will call the concept, e.g. 'sks dog'")
        triggers = [t.strip() for t in phrase.split(",") if t.strip()]
        if images is None or images.shape[0] == 0:
            raise ValueError("images: no training images")
        base, removed = strip_concepts(model)
        if removed and (bank is None or not set(removed) <= set(bank.names())):
            log.warning(
                "SeqLoRA: the input model carried concepts %s that are not in the bank input; they are "
                "left out (connect their bank to keep them)",
                removed,
            )
        arch = architecture(base)
        if getattr(base.model, "adm_channels", 0):
            raise ValueError(
                f"model: training inside ComfyUI supports SD1.x/SD2.x UNets; this {arch} model needs "
                "extra conditioning (ADM). Train it with the command line; its bank loads here."
            )
        if bank is not None:
            bank = bank_for_model(bank, base)

        n = int(images.shape[0])
        lines = [] if captions is None else captions.split("\n")
        if captions is not None and captions.strip() == "":
            lines = []
        if len(lines) == 1 and n > 1:
            lines = lines * n
        if lines and len(lines) != n:
            raise ValueError(f"captions: {len(lines)} lines for {n} images; give one caption per image or none")
        raw = lines or [""] * n
        caps = [make_caption(c, phrase, caption_template) for c in raw]
        prior_caps = [make_prior_caption(c, phrase) for c in caps]

        cfg = TrainConfig(
            name=name,
            triggers=triggers,
            method=method,
            rank=int(rank),
            steps=int(steps),
            lr=float(learning_rate),
            budget=float(interference_budget),
            targets=target_preset,
            seed=int(seed),
            layer_naming="ldm",
            architecture=arch,
            checkpoint_every=25,
        )
        cfg.validate()

        mm.load_models_gpu([base], force_full_load=True)
        diffusion = base.model.diffusion_model
        from ..seqlora_core.targets import find_targets

        specs = bank.layers if bank is not None else find_targets(diffusion, target_preset)
        h = hashlib.sha256()
        h.update(json.dumps({k: v for k, v in cfg.__dict__.items()}, sort_keys=True, default=str).encode())
        h.update(json.dumps([caps, prior_caps, int(batch_size), "eps", arch]).encode())
        _tensor_digest(h, images)
        h.update(model_digest(diffusion, specs).encode())
        prev_bank = bank
        if bank is not None and name in bank.names():
            prev_bank = bank.truncated_before(name)
        h.update(bank_digest(prev_bank).encode())
        key = h.hexdigest()[:20]

        if bank is not None and name in bank.names():
            if bank.concept(name).info.get(KEY_FIELD) == key:
                log.info("SeqLoRA: concept %r is already in the bank, trained from these inputs; reusing it", name)
                return self._outputs(base, bank, bank.concept(name).loss_curve)
            raise ValueError(
                f"concept_name: {name!r} is already in the bank (trained from other inputs); choose another name, "
                f"or load the bank saved before it was added"
            )

        stem = bankfiles.safe_name(name, "concept_name")[: -len(".safetensors")]
        done = bankfiles.autosave_dir() / f"{stem}-{key}.bank"
        cfg.checkpoint_path = str(bankfiles.autosave_dir() / f"{stem}-{key}.checkpoint")
        cfg.extra_info = {KEY_FIELD: key}
        if done.is_file():
            try:
                cached = ConceptBank.load(done)
                if cached.names() and cached.names()[-1] == name:
                    log.info("SeqLoRA: %r was trained from these inputs before; loaded %s", name, done.name)
                    return self._outputs(base, cached, cached.concept(name).loss_curve)
            except Exception as e:  # an unreadable cache only costs a retrain
                log.warning("SeqLoRA: ignoring unreadable autosave %s (%s)", done, e)

        device = mm.get_torch_device()
        with torch.inference_mode():
            latents = base.model.process_latent_in(vae.encode(images[..., :3])).float()
            conds, prior_conds = self._encode(clip, caps), self._encode(clip, prior_caps)
        mm.load_models_gpu([base], force_full_load=True)  # again: encoding may have offloaded it
        with torch.inference_mode(False):
            _make_autograd_safe(diffusion)
            # clones made here are normal tensors that autograd may save
            data = DenoiseData(latents.clone(), [c.clone() for c in conds], [c.clone() for c in prior_conds])
            loss_fn = make_loss(base.model, data, device)
            shape = tuple(latents.shape[1:])
            batches = make_batches(n, int(batch_size), int(seed), shape)
            prior_batches = make_batches(n, int(batch_size), int(seed), shape, prior=True)

            pbar = comfy.utils.ProgressBar(int(steps), node_id=unique_id)
            last = {"t": 0.0}

            def on_step(info: StepInfo) -> None:
                now = time.monotonic()
                if now - last["t"] >= 0.2 or info.step >= info.total or info.step <= 1:
                    last["t"] = now
                    _send(
                        LOSS_EVENT,
                        {
                            "node": unique_id,
                            "step": info.step,
                            "total": info.total,
                            "loss": info.loss if math.isfinite(info.loss) else None,
                            "interference": info.interference,
                        },
                    )
                pbar.update_absolute(info.step, info.total)

            callbacks = TrainCallbacks(on_step=on_step, should_stop=mm.processing_interrupted)
            try:
                new_bank = train_concept(diffusion, loss_fn, batches, cfg, bank, prior_batches, callbacks)
            except TrainingCancelled:
                mm.throw_exception_if_processing_interrupted()
                raise mm.InterruptProcessingException() from None
            finally:
                mm.soft_empty_cache()
        new_bank.save(done)
        _prune_autosaves(done, keep=AUTOSAVE_KEEP)
        return self._outputs(base, new_bank, new_bank.concept(name).loss_curve)

    @staticmethod
    def _encode(clip, texts: list[str]) -> list[torch.Tensor]:
        cache: dict[str, torch.Tensor] = {}
        for text in texts:
            if text not in cache:
                cache[text] = clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0].detach().float()
        return [cache[t] for t in texts]

    @staticmethod
    def _outputs(base, bank: ConceptBank, losses: list[float]):
        model = apply_merged(base, bank, {n: 1.0 for n in bank.names()})
        return (bank, model, {"loss": [float(x) for x in losses]})


# --------------------------------------------------------------------------- dataset


def _resolve_folder(folder: str) -> Path:
    text = folder.strip()
    if not text:
        raise ValueError("folder: empty; give a folder of training images")
    p = Path(os.path.expanduser(text))
    if not p.is_absolute():
        p = Path(folder_paths.get_input_directory()) / p
    if not p.is_dir():
        raise FileNotFoundError(
            f"image folder not found: {text!r} (looked in {p}); put the concept's images in "
            f"a folder under ComfyUI's input folder or give an absolute path"
        )
    return p


@_configure(schema.IMAGE_FOLDER)
class SeqLoRAImageFolder:
    @classmethod
    def IS_CHANGED(cls, folder: str, resolution: int) -> str:
        try:
            root = _resolve_folder(folder)
        except (OSError, ValueError):
            return "missing"
        h = hashlib.sha256(str(resolution).encode())
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def run(self, folder: str, resolution: int):
        root = _resolve_folder(folder)
        ds = ConceptDataset.from_folder(root, trigger="concept", caption_template="", resolution=int(resolution))
        idx = ds.weighted_indices()
        pixels = torch.stack([ds.pixels_u8[i].permute(1, 2, 0) for i in idx]).float() / 255.0
        lines = []
        for i in idx:
            txt = ds.paths[i].with_suffix(".txt")
            text = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""
            lines.append(" ".join(text.split()))
        return (pixels, "\n".join(lines), len(idx))


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
        items = schema.parse_concepts(concepts)
        available = chosen.names()
        unknown = [n for n, _, _ in items if n not in available]
        if unknown:
            raise ValueError(
                f"concepts: {', '.join(map(repr, unknown))} not in the bank; it has: "
                f"{', '.join(available) or 'no concepts'}"
            )
        strengths = {n: s for n, s, on in items if on} if items else {n: 1.0 for n in available}
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
    def run(self, bank: ConceptBank, name: str, overwrite: bool):
        path = bankfiles.bank_dir() / bankfiles.safe_name(name, "name")
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path.name} already exists in models/seqlora; turn on overwrite or choose another name"
            )
        bankfiles.keep_backup(path)
        bank.save(path)
        text = f"saved {path.name}: {len(bank.concepts)} concepts ({', '.join(bank.names())})"
        return {"ui": {"text": [text]}, "result": (str(path),)}


@_configure(schema.EXPORT)
class SeqLoRAExportLoRA:
    def run(self, bank: ConceptBank, concept_name: str, filename: str, dtype: str, overwrite: bool):
        from ..seqlora_core.lora_io import export_concept

        if not bank.concepts:
            raise ValueError("bank: it has no concepts to export")
        name = concept_name.strip() or bank.names()[-1]
        concept = bank.concept(name)
        out_dir = Path(folder_paths.get_folder_paths("loras")[0])
        path = out_dir / bankfiles.safe_name(filename.strip() or name, "filename")
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path.name} already exists in models/loras; turn on overwrite or choose another file name"
            )
        export_concept(bank, name, path, "kohya", dtype)
        folder_paths.filename_list_cache.pop("loras", None)
        text = f"exported {name!r} to models/loras/{path.name} (triggers: {', '.join(concept.triggers)})"
        return {"ui": {"text": [text]}, "result": (str(path),)}


def format_report(rep: dict[str, Any]) -> str:
    """The report as plain text: matrix, bound, drift and the layers whose capacity ran out."""
    names = rep["concepts"]
    lines = [f"{len(names)} concepts; mean relative interference {rep['mean_relative_interference']:.4f}"]
    if names:
        w = max(8, *(len(n) for n in names))
        lines.append("R(t->j)/R(t->t), rows t, columns j:")
        lines.append(" " * (w + 1) + " ".join(f"{j:>8d}" for j in range(len(names))))
        for t, row in enumerate(rep["interference"]):
            lines.append(f"{names[t]:<{w}} " + " ".join(f"{v:8.4f}" for v in row))
        lines.append(f"forgetting bound (p >= {1 - rep['bound_delta']:.2f}), relative:")
        for t, row in enumerate(rep["bound"]):
            lines.append(f"{names[t]:<{w}} " + " ".join(f"{v:8.4f}" for v in row))
        lines.append("base drift: " + ", ".join(f"{n} {d:.4f}" for n, d in zip(names, rep["base_drift"], strict=True)))
    soft = {k: v for k, v in rep["capacity"].items() if v["soft"]}
    used = max((v["used"] / max(v["total"], 1) for v in rep["capacity"].values()), default=0.0)
    lines.append(f"capacity: fullest layer {used:.0%} used")
    if soft:
        first = next(iter(soft))
        lines.append(
            f"{len(soft)} layers ran out of room (orthogonality is a penalty there), e.g. {first}: "
            f"{', '.join(soft[first]['soft'])}"
        )
    return "\n".join(lines)


@_configure(schema.REPORT)
class SeqLoRAInterferenceReport:
    def run(self, bank: ConceptBank, delta: float):
        rep = build_report(bank, float(delta))
        img = heatmap_image(rep)
        text = format_report(rep)
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
    )
}
NODE_DISPLAY_NAME_MAPPINGS = {k: v.SPEC.display_name for k, v in NODE_CLASS_MAPPINGS.items()}
