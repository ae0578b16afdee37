"""The SeqLoRA nodes described in plain Python: ids, inputs, tooltips, ranges, outputs.

No ComfyUI import: the node classes in :mod:`.comfy_nodes` build ``INPUT_TYPES`` from these
descriptions, and the tests check them (tooltips, ranges, defaults, workflow widget counts) without
ComfyUI. Dynamic choices (files in a model folder, methods, presets) are named by a ``choices`` key
and resolved when ComfyUI asks for the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..seqlora_core.data.captions import DEFAULT_TEMPLATE
from ..seqlora_core.data.dataset import MAX_RESOLUTION

CATEGORY = "SeqLoRA"
BANK = "SEQLORA_BANK"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
LINKED_BANK = "(linked bank)"
LAST_CONCEPT = ""


@dataclass(frozen=True)
class Inp:
    """One input. ``type`` is a ComfyUI type name, or "COMBO" with ``choices`` (a list or a key)."""

    name: str
    type: str
    tooltip: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | str | None = None
    multiline: bool = False
    optional: bool = False
    force_input: bool = False
    control_after_generate: bool | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.force_input

    def widget_count(self) -> int:
        """How many entries this input takes in a UI workflow's ``widgets_values``."""
        if not self.is_widget:
            return 0
        control = self.control_after_generate
        if control is None:
            control = self.type == "INT" and self.name in ("seed", "noise_seed")
        return 2 if control else 1


@dataclass(frozen=True)
class Out:
    type: str
    name: str
    tooltip: str


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[Inp, ...]
    outputs: tuple[Out, ...] = ()
    output_node: bool = False
    hidden: Mapping[str, str] = field(default_factory=dict)

    def widgets(self) -> list[Inp]:
        return [i for i in self.inputs if i.is_widget]

    def widget_count(self) -> int:
        return sum(i.widget_count() for i in self.inputs)

    def input(self, name: str) -> Inp:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(name)


def _static_choices(key: str) -> tuple[str, ...]:
    """Choices that do not depend on ComfyUI (methods and target presets come from the core)."""
    if key == "methods":
        from ..seqlora_core.method.methods import METHODS

        return tuple(METHODS)
    if key == "presets":
        from ..seqlora_core.method.targets import PRESETS

        return tuple(PRESETS)
    raise KeyError(key)


def input_types(spec: NodeSpec, resolve: Callable[[str], list[str]] | None = None) -> dict[str, dict]:
    """The V1 ``INPUT_TYPES()`` dict of a node; ``resolve(key)`` lists dynamic choices (files)."""
    out: dict[str, dict] = {"required": {}, "optional": {}}
    for inp in spec.inputs:
        opts: dict[str, Any] = {"tooltip": inp.tooltip}
        for k in ("default", "min", "max", "step"):
            v = getattr(inp, k)
            if v is not None:
                opts[k] = v
        if inp.multiline:
            opts["multiline"] = True
        if inp.force_input:
            opts["forceInput"] = True
        if inp.control_after_generate is not None:
            opts["control_after_generate"] = inp.control_after_generate
        if inp.type == "COMBO":
            if isinstance(inp.choices, str):
                try:
                    choices = list(_static_choices(inp.choices))
                except KeyError:
                    choices = list(resolve(inp.choices)) if resolve else []
            else:
                choices = list(inp.choices or ())
            entry: tuple = (choices, opts)
        else:
            entry = (inp.type, opts)
        out["optional" if inp.optional else "required"][inp.name] = entry
    if spec.hidden:
        out["hidden"] = dict(spec.hidden)
    if not out["optional"]:
        del out["optional"]
    return out


SEED_MAX = 0xFFFFFFFFFFFFFFFF

TRAIN = NodeSpec(
    "SeqLoRATrainConcept",
    "SeqLoRA Train Concept",
    "Learn one concept as a LoRA whose basis is orthogonal to the earlier concepts of the bank "
    "(SeqLoRA). Outputs the bank with the new concept appended and the model with every concept of the "
    "bank applied. Progress is autosaved: queue again after a cancel to resume.",
    (
        Inp(
            "model",
            "MODEL",
            "The base diffusion model: SD1.x, SD2.x (512 or 768-v) or SDXL. SeqLoRA concepts already "
            "applied to it are ignored: the bank input supplies the earlier concepts.",
        ),
        Inp("clip", "CLIP", "Text encoder used to encode the training captions."),
        Inp("vae", "VAE", "VAE used to encode the training images into latents."),
        Inp(
            "images",
            "IMAGE",
            "The concept's training images (3-20 is typical), e.g. from "
            "'SeqLoRA Image Folder' or Load Image nodes batched together.",
        ),
        Inp("concept_name", "STRING", "Unique name of the concept inside the bank (e.g. 'my_dog').", default="concept"),
        Inp(
            "trigger_words",
            "STRING",
            "Trigger word(s) that call the concept in prompts (e.g. 'sks dog'). "
            "Added to every caption that lacks them.",
            default="sks",
        ),
        Inp(
            "method",
            "COMBO",
            "seqlora: the bilevel method (learned orthogonal basis). The others are baselines for comparison.",
            default="seqlora",
            choices="methods",
        ),
        Inp(
            "rank",
            "INT",
            "LoRA rank r of the concept at every layer (4-16 is typical).",
            default=4,
            min=1,
            max=128,
            step=1,
        ),
        Inp("steps", "INT", "Training steps for this concept.", default=500, min=1, max=100000, step=1),
        Inp(
            "learning_rate",
            "FLOAT",
            "Learning rate of the up factor B (the basis uses 0.1x).",
            default=1e-4,
            min=1e-7,
            max=1.0,
            step=1e-6,
        ),
        Inp(
            "interference_budget",
            "FLOAT",
            "Allowed interference on earlier concepts, relative to the "
            "concept's own energy (eps of the constraint; 0.05 = 5%).",
            default=0.05,
            min=0.0,
            max=10.0,
            step=0.005,
        ),
        Inp(
            "target_preset",
            "COMBO",
            "Which layers get adapters: attn = attention q/k/v/out of every transformer block (default).",
            default="attn",
            choices="presets",
        ),
        Inp(
            "seed",
            "INT",
            "Seed of the data order, noise and timesteps; same inputs + seed = same result.",
            default=0,
            min=0,
            max=SEED_MAX,
            control_after_generate=False,
        ),
        Inp("batch_size", "INT", "Images per training step.", default=1, min=1, max=64),
        Inp(
            "caption_template",
            "STRING",
            "Caption for images without one; {trigger} is replaced by the trigger words.",
            default=DEFAULT_TEMPLATE,
        ),
        Inp(
            "bank",
            BANK,
            "Bank of earlier concepts (from Load Bank or a previous Train node). Leave empty to start a new bank.",
            optional=True,
        ),
        Inp(
            "captions",
            "STRING",
            "One caption per image, one per line (e.g. from 'SeqLoRA Image Folder'); empty lines use the template.",
            optional=True,
            force_input=True,
        ),
        Inp(
            "class_prompt",
            "STRING",
            "Only for a new bank: a prompt for what the concepts are kinds of, without trigger words (e.g. "
            "'a photo of a dog'). The base model generates a few images from it, from generic prompts and "
            "the empty prompt; what it does there is what every concept of the bank must leave alone.",
            default="",
            optional=True,
        ),
    ),
    (
        Out(BANK, "bank", "The bank with this concept appended."),
        Out("MODEL", "model", "The model with every concept of the bank applied (merged, strength 1)."),
        Out("LOSS_MAP", "loss", "The loss curve, for ComfyUI's Plot Loss Graph node."),
    ),
    hidden={"unique_id": "UNIQUE_ID"},
)

IMAGE_FOLDER = NodeSpec(
    "SeqLoRAImageFolder",
    "SeqLoRA Image Folder",
    "Read a concept's training images (and same-name .txt captions) from a folder; kohya 'N_name' "
    "subfolders repeat their images N times.",
    (
        Inp(
            "folder",
            "STRING",
            "Folder of training images inside ComfyUI's input/seqlora folder, e.g. 'seqlora/my_concept' "
            "(or an absolute path inside a folder that extra_model_paths.yaml lists as seqlora_images). "
            "Nothing outside these folders is read, links included.",
            default="seqlora/my_concept",
        ),
        Inp(
            "resolution",
            "INT",
            "Side of the square training images (center crop); 512 for SD1.5.",
            default=512,
            min=64,
            max=MAX_RESOLUTION,
            step=64,
        ),
    ),
    (
        Out("IMAGE", "images", "The images, resized to resolution x resolution."),
        Out("STRING", "captions", "One caption per image, one per line (empty where no .txt exists)."),
        Out("INT", "count", "Number of images (repeats included)."),
    ),
)

LOADER = NodeSpec(
    "SeqLoRAMultiConceptLoader",
    "SeqLoRA Multi-Concept Loader",
    "Apply any subset of the bank's concepts with their own strengths, without fusion: W = W0 + sum s_t dW_t.",
    (
        Inp("model", "MODEL", "The base model the bank was trained on."),
        Inp(
            "bank_file",
            "COMBO",
            "Bank file in models/seqlora, or '(linked bank)' to use the bank input.",
            default=LINKED_BANK,
            choices="bank_files",
        ),
        Inp(
            "concepts",
            "STRING",
            "Which concepts and how strongly: 'name:strength, ...'; '!name:s' keeps a "
            "concept listed but off. Empty = every concept at 1.0. The node's concept list edits this.",
            default="",
        ),
        Inp(
            "mode",
            "COMBO",
            "merged: added into the weights (no cost per step, ComfyUI's patch mechanism). "
            "bypass: y = f(x) + sum s B(Ax) at run time (instant toggling, quantised/offloaded weights).",
            default="merged",
            choices=("merged", "bypass"),
        ),
        Inp(
            "bank",
            BANK,
            "A bank from Load Bank or a Train node; used when bank_file is '(linked bank)'.",
            optional=True,
        ),
    ),
    (Out("MODEL", "model", "The model with the chosen concepts applied."),),
    hidden={"unique_id": "UNIQUE_ID"},
)

LOAD_BANK = NodeSpec(
    "SeqLoRALoadBank",
    "SeqLoRA Load Bank",
    "Load a concept bank (.safetensors) from models/seqlora.",
    (Inp("bank_file", "COMBO", "Bank file in models/seqlora.", choices="bank_files_only"),),
    (Out(BANK, "bank", "The loaded bank."),),
)

SAVE_BANK = NodeSpec(
    "SeqLoRASaveBank",
    "SeqLoRA Save Bank",
    "Save a concept bank to models/seqlora (atomic write). An existing file is never lost: the bank goes "
    "to a new numbered name (name_00001, ...) unless overwrite is on, which keeps the old file as a .bak.",
    (
        Inp("bank", BANK, "The bank to save."),
        Inp("name", "STRING", "File name in models/seqlora ('.safetensors' is added).", default="my_concepts"),
        Inp(
            "overwrite",
            "BOOLEAN",
            "On: replace an existing file of that name (its old version is kept as <name>.safetensors.bak, "
            ".bak2, ...). Off: when the name is taken, save under the next free numbered name.",
            default=False,
        ),
    ),
    (Out("STRING", "path", "Where the bank was written."),),
    output_node=True,
)

EXPORT = NodeSpec(
    "SeqLoRAExportLoRA",
    "SeqLoRA Export LoRA",
    "Export one concept as an ordinary kohya LoRA into models/loras (trigger words in the metadata); it "
    "loads with the stock LoraLoader and in A1111/Forge.",
    (
        Inp("bank", BANK, "The bank holding the concept."),
        Inp("concept_name", "STRING", "Concept to export; empty = the last concept of the bank.", default=LAST_CONCEPT),
        Inp("filename", "STRING", "File name in models/loras; empty = the concept name.", default=""),
        Inp(
            "dtype",
            "COMBO",
            "Precision of the file: fp16 (usual), bf16, or fp32 (bit-exact factors).",
            default="fp16",
            choices=("fp16", "bf16", "fp32"),
        ),
        Inp(
            "overwrite",
            "BOOLEAN",
            "On: replace an existing file of that name (the old one is kept as a .bak copy). Off: refuse if "
            "it exists. A SeqLoRA bank is never replaced.",
            default=False,
        ),
    ),
    (Out("STRING", "path", "Where the LoRA was written."),),
    output_node=True,
)

REMOVE = NodeSpec(
    "SeqLoRARemoveConcept",
    "SeqLoRA Remove Concept",
    "Drop one concept from a bank; the later concepts stay as they are. Save the result with Save Bank "
    "(a new numbered file unless overwrite is on), so the previous version is kept.",
    (
        Inp("bank", BANK, "The bank to remove the concept from."),
        Inp("concept_name", "STRING", "Name of the concept to remove.", default=""),
    ),
    (Out(BANK, "bank", "The bank without that concept."),),
)

REPORT = NodeSpec(
    "SeqLoRAInterferenceReport",
    "SeqLoRA Interference Report",
    "Relative interference R(t->j)/R(t->t) between every pair of concepts, the forgetting bound and "
    "per-layer capacity, as a heatmap and text.",
    (
        Inp("bank", BANK, "The bank to report on."),
        Inp(
            "delta",
            "FLOAT",
            "Failure probability of the forgetting bound (0.05 = 95% bound).",
            default=0.05,
            min=1e-6,
            max=0.5,
            step=0.01,
        ),
    ),
    (
        Out("IMAGE", "heatmap", "Heatmap of the relative interference (rows t, columns j)."),
        Out("STRING", "text", "The report as text."),
    ),
    output_node=True,
)

NODES: tuple[NodeSpec, ...] = (TRAIN, IMAGE_FOLDER, LOADER, LOAD_BANK, SAVE_BANK, EXPORT, REPORT, REMOVE)
BY_ID: dict[str, NodeSpec] = {n.node_id: n for n in NODES}
