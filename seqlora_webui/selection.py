"""The accordion's value as text: the selection string, the infotext field and the ``<lora:...>`` tags.

One field carries a whole selection, so the API, the infotext and "send to txt2img" round-trip it:
``SeqLoRA: "my_bank.safetensors: sks:1, zqx:0.7, !old:1"`` (``!`` = listed but off).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ._core import format_concepts, parse_concepts

INFOTEXT_KEY = "SeqLoRA"
BANK_SUFFIX = ".safetensors"


def active(items: Iterable[tuple[str, float, bool]]) -> dict[str, float]:
    """The concepts that are on with a non-zero strength, in order (a later duplicate wins)."""
    out: dict[str, float] = {}
    for name, strength, on in items:
        if on and strength != 0:
            out[name] = strength
        else:
            out.pop(name, None)
    return out


def infotext_value(bank: str, selection: str) -> str:
    """``bank: selection`` with the selection normalised (strengths as %g)."""
    return f"{bank}: {format_concepts(parse_concepts(selection))}"


def parse_infotext_value(value: str) -> tuple[str, str]:
    """(bank file, selection) from an infotext value; ValueError when it is not one of ours."""
    text = value.strip().strip('"').strip()
    cut = text.find(BANK_SUFFIX + ":")
    if cut >= 0:
        bank, selection = text[: cut + len(BANK_SUFFIX)], text[cut + len(BANK_SUFFIX) + 1 :]
    else:
        bank, sep, selection = text.partition(":")
        if not sep:
            raise ValueError(f"{INFOTEXT_KEY}: {value!r} is not 'bank.safetensors: name:strength, ...'")
    bank = bank.strip()
    if not bank:
        raise ValueError(f"{INFOTEXT_KEY}: {value!r} names no bank")
    parse_concepts(selection)  # raises on a malformed selection
    return bank, selection.strip()


def lora_tag(network_name: str, strength: float) -> str:
    return f"<lora:{network_name}:{strength:g}>"


def tags_for(networks: Mapping[str, float]) -> str:
    """``<lora:a:1> <lora:b:0.7>`` for network name -> strength."""
    return " ".join(lora_tag(n, s) for n, s in networks.items())


def strip_tags(prompt: str, network_names: Iterable[str]) -> str:
    """The prompt without any ``<lora:NAME...>`` tag whose NAME is one of `network_names`."""
    names = sorted(set(network_names), key=len, reverse=True)
    if not names:
        return prompt
    pattern = re.compile(r"\s*<(?:lora|lyco):(?:" + "|".join(re.escape(n) for n in names) + r")(?::[^>]*)?>")
    return pattern.sub("", prompt).strip()


def add_tags(prompt: str, networks: Mapping[str, float], owned_prefix: str) -> str:
    """`prompt` with our tags for `networks` appended, after removing tags of ours already in it.

    `owned_prefix` is the file-name prefix of every network exported from the selected bank, so a
    prompt that already carries this bank's tags (pasted from an earlier image) is not patched twice.
    """
    pattern = re.compile(r"\s*<(?:lora|lyco):" + re.escape(owned_prefix) + r"[^:>]*(?::[^>]*)?>")
    base = pattern.sub("", prompt).rstrip()
    tags = tags_for(networks)
    if not tags:
        return base
    return f"{base} {tags}" if base else tags
