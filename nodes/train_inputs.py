"""The Train node's inputs, checked and turned into a training request (plain Python, no ComfyUI).

Every problem is a ValueError that names the input and the fix. The captions follow the shared caption
rules of ``seqlora_core.data.captions``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..seqlora_core.data.captions import check_template, make_caption
from ..seqlora_core.method.trainer import TrainConfig

CHECKPOINT_EVERY = 25  # steps between autosaved checkpoints inside ComfyUI


@dataclass
class TrainRequest:
    """What one Train node run trains: the concept's config and one caption per image."""

    config: TrainConfig
    phrase: str  # the trigger words as typed: prepended to captions that lack them
    captions: list[str]
    batch_size: int

    @property
    def name(self) -> str:
        return self.config.name


def caption_lines(captions: str | None, n_images: int) -> list[str]:
    """One raw caption per image from the node's ``captions`` text (one per line; "" where none).

    No text or only whitespace: no captions. One line for several images: the same caption for all.
    """
    lines = [] if captions is None or captions.strip() == "" else captions.split("\n")
    if len(lines) == 1 and n_images > 1:
        lines = lines * n_images
    if lines and len(lines) != n_images:
        raise ValueError(f"captions: {len(lines)} lines for {n_images} images; give one caption per image or none")
    return lines or [""] * n_images


# TrainConfig's field names -> the node's input names, for messages
INPUT_NAMES = {
    "name": "concept_name",
    "triggers": "trigger_words",
    "lr": "learning_rate",
    "budget": "interference_budget",
    "targets": "target_preset",
}


def _input_name(message: str) -> str:
    """A TrainConfig message ('lr: ...') with the node input's name ('learning_rate: ...')."""
    field, sep, rest = message.partition(": ")
    key = field.split("[")[0]
    return f"{INPUT_NAMES[key]}: {rest}" if sep and key in INPUT_NAMES else message


def check_train_inputs(
    n_images: int,
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
    captions: str | None,
    architecture: str,
) -> TrainRequest:
    """The checked request; ValueError naming the first bad input."""
    name = concept_name.strip()
    if not name:
        raise ValueError("concept_name: empty; give the concept a unique name such as 'my_dog'")
    phrase = trigger_words.strip()
    if not phrase:
        raise ValueError("trigger_words: empty; give the word(s) that will call the concept, e.g. 'sks dog'")
    triggers = [t.strip() for t in phrase.split(",") if t.strip()]
    if n_images == 0:
        raise ValueError("images: no training images")
    check_template(caption_template, "caption_template")
    caps = [make_caption(c, phrase, caption_template) for c in caption_lines(captions, n_images)]
    config = TrainConfig(
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
        architecture=architecture,
        checkpoint_every=CHECKPOINT_EVERY,
    )
    try:
        config.validate()
    except ValueError as e:
        raise ValueError(_input_name(str(e))) from None
    return TrainRequest(config, phrase, caps, int(batch_size))
