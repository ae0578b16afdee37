"""The Train node's bad inputs are errors that name the node's own input and the fix (no ComfyUI needed:
the pack is loaded the way ComfyUI loads it, and its input checking is plain Python)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = "seqlora_pack_inputs_test"


@pytest.fixture(scope="module")
def train_inputs():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{PACK}.nodes.train_inputs")


GOOD = dict(
    n_images=2,
    concept_name="dog",
    trigger_words="sks dog",
    method="seqlora",
    rank=4,
    steps=10,
    learning_rate=1e-4,
    interference_budget=0.05,
    target_preset="attn",
    seed=0,
    batch_size=1,
    caption_template="a photo of {trigger}",
    captions=None,
    architecture="sd15",
)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"concept_name": "a,b"}, "concept_name: 'a,b' holds ','"),
        ({"concept_name": "dog:1"}, "concept_name: 'dog:1' holds ':'"),
        ({"concept_name": "\x1b[2Jdog"}, "concept_name: the name holds control characters"),
        ({"concept_name": "d" * 101}, "concept_name: the name has 101 characters; use at most 100"),
        ({"trigger_words": "x" * 300}, "trigger_words: 300 characters is too long"),
        ({"trigger_words": "sks\x07"}, "trigger_words: the text holds control characters"),
        ({"learning_rate": 5.0}, "learning_rate: 5 is out of range"),
        ({"interference_budget": float("nan")}, "interference_budget: nan; give a finite number"),
        ({"caption_template": "a {x}"}, "caption_template: 'a {x}' names {x}"),
        ({"rank": 0}, "rank: 0 is out of range"),
    ],
)
def test_bad_train_inputs_name_the_input(train_inputs, change, message) -> None:
    with pytest.raises(ValueError) as err:
        train_inputs.check_train_inputs(**{**GOOD, **change})
    assert message in str(err.value), str(err.value)


def test_good_inputs_pass(train_inputs) -> None:
    request = train_inputs.check_train_inputs(**GOOD)
    assert request.config.name == "dog" and request.captions == ["a photo of sks dog"] * 2
