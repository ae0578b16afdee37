"""The selection grammar ('name:strength, !off:0.5') shared by the command line, the ComfyUI loader and
the frontend (whose copy tests/test_web_js.py checks for parity)."""

from __future__ import annotations

import pytest

from seqlora_core.method.selection import enabled_strengths, format_selection, parse_selection


def test_parse_selection() -> None:
    assert parse_selection("") == []
    assert parse_selection("dog:0.5, !cat:1.2,hat") == [("dog", 0.5, True), ("cat", 1.2, False), ("hat", 1.0, True)]
    assert parse_selection("a:1\n!b:2") == [("a", 1.0, True), ("b", 2.0, False)]
    assert parse_selection("x:y:0.3") == [("x:y", 0.3, True)]  # the last ':' separates the strength
    items = parse_selection("a:1, !b:0.25")
    assert parse_selection(format_selection(items)) == items
    assert enabled_strengths(items) == {"a": 1.0}
    with pytest.raises(ValueError, match="concepts: strength 'strong' of 'dog' is not a number"):
        parse_selection("dog:strong")
    for bad in ("strong", "nan", "inf", "-inf"):  # each message says what to write instead
        with pytest.raises(ValueError, match=f"strength '{bad}' of 'dog' .*; write e.g. dog:1.0"):
            parse_selection(f"dog:{bad}")
    with pytest.raises(ValueError, match="--concepts: empty concept name"):
        parse_selection(":0.5", "--concepts")
