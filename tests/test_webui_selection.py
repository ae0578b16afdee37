"""The A1111/Forge accordion's text value: the selection (the core's grammar), infotext field, tags."""

from __future__ import annotations

import random

import pytest

from seqlora_webui import _core
from seqlora_webui.selection import (
    active,
    add_tags,
    infotext_value,
    parse_infotext_value,
    strip_tags,
    tags_for,
)

_NAME_CHARS = "abcxyzSKS019_-. éü漢字()[]<>=+*/\\'\"\t"


def _random_selection(rng: random.Random) -> list[tuple[str, float, bool]]:
    """Up to six (name, strength, on) items; names avoid the grammar's separators (, : ! newline)."""
    out = []
    for _ in range(rng.randint(0, 6)):
        name = "".join(rng.choice(_NAME_CHARS) for _ in range(rng.randint(1, 12))).strip() or "x"
        out.append((name, round(rng.uniform(-3, 3), 3), rng.random() < 0.5))
    return out


@pytest.mark.parametrize("seed", range(200))
def test_format_then_parse_round_trips(seed):
    sel = _random_selection(random.Random(seed))
    assert _core.parse_concepts(_core.format_concepts(sel)) == [(n, float(f"{s:g}"), on) for n, s, on in sel]


def test_bad_strength_names_the_concept():
    with pytest.raises(ValueError, match="strength 'abc' of 'dog' is not a number"):
        _core.parse_concepts("dog:abc")


def test_active_keeps_only_concepts_that_are_on():
    assert active(_core.parse_concepts("a:1, !b:0.5, c:0, d:0.7, a:0.2")) == {"d": 0.7, "a": 0.2}


@pytest.mark.parametrize("bank", ["my_bank.safetensors", "sub/with space.safetensors", "odd:name.safetensors"])
def test_infotext_value_round_trip(bank):
    value = infotext_value(bank, " sks:1.0 ,!zqx:0.70")
    assert value == f"{bank}: sks:1, !zqx:0.7"
    assert parse_infotext_value(value) == (bank, "sks:1, !zqx:0.7")
    assert parse_infotext_value(f'"{value}"') == (bank, "sks:1, !zqx:0.7")  # as A1111 quotes it


@pytest.mark.parametrize("bad", ["no selection here", ": sks:1", "b.safetensors: sks:x"])
def test_infotext_value_that_is_not_ours_is_an_error(bad):
    with pytest.raises(ValueError):
        parse_infotext_value(bad)


def test_tags_are_appended_once_and_other_loras_stay():
    nets = {"bank__sks": 1.0, "bank__zqx": 0.7}
    prompt = "a photo of sks dog <lora:style:0.5>"
    once = add_tags(prompt, nets, "bank__")
    assert once == "a photo of sks dog <lora:style:0.5> " + tags_for(nets)
    assert tags_for(nets) == "<lora:bank__sks:1> <lora:bank__zqx:0.7>"
    assert add_tags(once, nets, "bank__") == once  # a pasted prompt that already has our tags
    assert add_tags(once, {"bank__sks": 0.5}, "bank__") == "a photo of sks dog <lora:style:0.5> <lora:bank__sks:0.5>"
    assert add_tags("<lora:bank__old:1>", {}, "bank__") == ""
    assert add_tags("x <lora:other_bank__sks:1>", nets, "bank__").startswith("x <lora:other_bank__sks:1> ")


def test_strip_tags_removes_exactly_the_named_networks():
    prompt = "cat <lora:b__sks:1> <lyco:b__zqx:0.7:0.5> <lora:b__sksx:1> <lora:keep:1>"
    assert strip_tags(prompt, ["b__sks", "b__zqx"]) == "cat <lora:b__sksx:1> <lora:keep:1>"
