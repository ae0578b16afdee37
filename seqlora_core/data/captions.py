"""Caption rules, shared by the command line, the dataset reader and the ComfyUI nodes.

- Reading a caption file: UTF-8 with or without a byte-order mark, or UTF-16/UTF-32 with one (what
  Windows editors write as "Unicode"); undecodable bytes become U+FFFD instead of failing.
- The training caption: the caption (or the template when it is empty) with the trigger prepended when
  it lacks it (whole words, case-insensitive).
- The prior caption: the caption with the trigger removed (or replaced by a class word).
"""

from __future__ import annotations

import codecs
import os
import re
import string
from pathlib import Path

DEFAULT_TEMPLATE = "a photo of {trigger}"  # the caption of an image without one

# longest first: the UTF-32 LE mark starts with the UTF-16 LE one
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def decode_caption(data: bytes) -> str:
    """Caption bytes -> text: the encoding its byte-order mark names (the mark dropped); without a mark,
    UTF-16 when every other byte is NUL (how UTF-16 text of Latin letters looks), else UTF-8."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding, errors="replace")
    if len(data) >= 2 and len(data) % 2 == 0:
        even, odd = data[0::2], data[1::2]
        if odd.count(0) == len(odd) and even.count(0) == 0:
            return data.decode("utf-16-le", errors="replace")
        if even.count(0) == len(even) and odd.count(0) == 0:
            return data.decode("utf-16-be", errors="replace")
    return data.decode("utf-8", errors="replace")


def check_template(template: str, field: str = "caption_template") -> str:
    """A caption template that names no placeholder but ``{trigger}``; ValueError naming ``field`` otherwise."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        why = f"{template!r} is not a valid template ({e}); write a brace as {{{{ or }}}}"
        raise ValueError(f"{field}: {why}") from None
    other = sorted({n for n in names if n != "trigger"})
    if other:
        raise ValueError(
            f"{field}: {template!r} names {', '.join('{' + n + '}' for n in other)}; the only placeholder is "
            "{trigger} (e.g. 'a photo of {trigger}')"
        )
    return template


def read_caption(path: str | os.PathLike) -> str | None:
    """The text of a caption file, or None when there is no such file."""
    path = Path(path)
    return decode_caption(path.read_bytes()) if path.is_file() else None


def caption_line(text: str | None) -> str:
    """A caption as one line with single spaces ("" for none): how captions travel one per line."""
    return " ".join((text or "").split())


def _trigger_pattern(trigger: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in trigger.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def _tidy(text: str) -> str:
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r"([,;])(\s*[,;])+", r"\1", text)
    return text.strip(" ,;")


def make_caption(caption: str | None, trigger: str, template: str) -> str:
    """The training caption: `template` if `caption` is empty, else `caption`; prepend the trigger.

    Rule: a caption that does not contain the trigger (whole words, case-insensitive) becomes
    `"{trigger}, {caption}"`.
    """
    text = _tidy(caption or "") or template.format(trigger=trigger)
    if not _trigger_pattern(trigger).search(text):
        text = f"{trigger}, {text}"
    return text


def make_prior_caption(caption: str, trigger: str, class_word: str | None = None) -> str:
    """The caption without the trigger (every whole-word, case-insensitive occurrence removed, or
    replaced by `class_word` when given), punctuation and spaces tidied. May be empty."""
    return _tidy(_trigger_pattern(trigger).sub(class_word or "", caption))
