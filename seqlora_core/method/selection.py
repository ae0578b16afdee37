"""The selection grammar: which concepts of a bank to compose, and how strongly.

``"dog:0.8, !hat:0.5, cat"``: items separated by commas (or new lines); ``name:strength`` with a
strength that defaults to 1.0; a leading ``!`` keeps a concept listed but switched off (its strength is
remembered for when it is switched on again). The last ``:`` separates the strength, so a name may hold
``:``. The command line (``--concepts``), the ComfyUI loader (its ``concepts`` field) and the frontend
(``web/seqlora.js``, checked for parity by the tests) all read this grammar.

:func:`check_concept_name` and :func:`check_trigger` say which names and trigger words a bank takes: a
name the grammar can select, and text without control characters (terminal escape codes) that fits a
prompt.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable

MAX_NAME = 100  # characters of a concept name
MAX_TRIGGER = 200  # characters of one trigger phrase (CLIP reads 75 tokens of a whole prompt)

Item = tuple[str, float, bool]  # (name, strength, enabled)
MAX_STRENGTH = 20.0  # |strength| above this is a typo, not a setting: 20x a concept's delta wrecks any model


def parse_selection(text: str, field: str = "concepts") -> list[Item]:
    """``'name:strength, !off:0.5, plain'`` -> ``[(name, strength, enabled), ...]`` in the given order.

    ValueError (naming ``field``) on a strength that is not a number or an empty name.
    """
    out: list[Item] = []
    for raw in text.replace("\n", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        enabled = not item.startswith("!")
        item = item.lstrip("!").strip()
        name, sep, strength = item.rpartition(":")
        if not sep:
            name, strength = item, "1"
        name = name.strip()
        if not name:
            raise ValueError(f"{field}: empty concept name in {raw.strip()!r}; write 'name:strength'")
        try:
            value = float(strength)
        except ValueError:
            raise ValueError(
                f"{field}: strength {strength.strip()!r} of {name!r} is not a number; write e.g. {name}:1.0"
            ) from None
        if not math.isfinite(value):
            raise ValueError(
                f"{field}: strength {strength.strip()!r} of {name!r} is not a finite number; write e.g. {name}:1.0"
            )
        out.append((name, value, enabled))
    return out


def format_selection(items: Iterable[Item]) -> str:
    """The text of parsed items (the inverse of :func:`parse_selection`)."""
    return ", ".join(f"{'' if on else '!'}{name}:{s:g}" for name, s, on in items)


def enabled_strengths(items: Iterable[Item]) -> dict[str, float]:
    """Concept name -> strength of the items that are switched on."""
    return {name: s for name, s, on in items if on}


def check_strengths(items: Iterable[Item], field: str = "concepts", limit: float = MAX_STRENGTH) -> None:
    """ValueError (naming ``field`` and the concept) on a strength that is not finite or beyond +-``limit``.

    ``nan``, ``inf`` and ``1e9`` parse as numbers, but composed into the weights they give a black or
    noise image without any error; switched-off items are checked too, since the switch may flip later.
    """
    for name, s, _ in items:
        if not math.isfinite(s):
            raise ValueError(f"{field}: strength {s} of {name!r} is not a finite number; use e.g. {name}:1.0")
        if abs(s) > limit:
            raise ValueError(
                f"{field}: strength {s:g} of {name!r} is outside -{limit:g}..{limit:g}; LoRA strengths are "
                f"usually 0..1.5, e.g. {name}:1.0"
            )


def control_characters(text: str) -> list[str]:
    """The control and format characters in ``text`` (escape codes, NUL, bidi overrides), as shown in messages."""
    return sorted({repr(ch) for ch in text if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn")})


def check_concept_name(name: str, field: str = "name") -> str:
    """``name`` stripped, when a bank can take it as a new concept's name; ValueError naming ``field`` otherwise.

    A name is non-empty, at most ``MAX_NAME`` characters, holds no control characters and none of the
    grammar's marks (',', ':', a new line, a leading '!'), so ``name:strength`` always selects it.
    """
    text = name.strip()
    if not text:
        raise ValueError(f"{field}: empty; give the concept a name, e.g. 'my_dog'")
    bad = control_characters(text)
    if bad:
        raise ValueError(f"{field}: the name holds control characters ({', '.join(bad[:5])}); use plain text")
    if len(text) > MAX_NAME:
        raise ValueError(f"{field}: the name has {len(text)} characters; use at most {MAX_NAME}")
    marks = [m for m in (",", ":") if m in text]
    if marks or text.startswith("!"):
        shown = " and ".join(repr(m) for m in marks) or "a leading '!'"
        raise ValueError(
            f"{field}: {text!r} holds {shown}, which the concept list reads as separators; "
            "use letters, digits, spaces, - or _ (e.g. 'my_dog')"
        )
    return text


def check_trigger(trigger: str, field: str = "trigger") -> str:
    """One trigger phrase stripped; ValueError naming ``field`` when it is empty, too long or holds control
    characters."""
    text = " ".join(trigger.split())
    if not text:
        raise ValueError(f"{field}: empty; give the word(s) that call the concept in prompts, e.g. 'sks dog'")
    bad = control_characters(text)
    if bad:
        raise ValueError(f"{field}: the text holds control characters ({', '.join(bad[:5])}); use plain text")
    if len(text) > MAX_TRIGGER:
        raise ValueError(
            f"{field}: {len(text)} characters is too long; use at most {MAX_TRIGGER} (a prompt holds 75 tokens in all)"
        )
    return text
