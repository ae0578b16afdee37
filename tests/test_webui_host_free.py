"""Host-free checks of the A1111/Forge accordion's paste handling, shape checks and its JavaScript."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from seqlora_core import BankMismatchError, ConceptBank, LayerSpec, find_targets
from seqlora_webui import _core, accordion
from seqlora_webui.shapes import check_fits, find_layers

ROOT = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")


class Block(nn.Module):
    def __init__(self, linear: type) -> None:
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = linear(8, 16)
        self.attn1.to_out = nn.Sequential(linear(16, 8))
        self.proj_in = nn.Conv2d(8, 8, 3)


class ForgeStyleLinear(nn.Module):
    """Like Forge's ``ForgeOperations.Linear``: a plain module holding a 2-D weight, not an ``nn.Linear``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


def test_layers_by_weight_shape_match_the_core_and_work_on_forge_style_modules():
    torch_model = nn.Sequential(Block(nn.Linear))
    assert find_layers(torch_model, "attn") == find_targets(torch_model, "attn")
    forge_model = nn.Sequential(Block(ForgeStyleLinear))
    with pytest.raises(ValueError):
        find_targets(forge_model, "attn")  # the core sees no layers in a Forge UNet
    assert find_layers(forge_model, "attn") == find_targets(torch_model, "attn")
    bank = ConceptBank(find_layers(forge_model, "attn"), "ldm", "sd15")
    check_fits(bank, forge_model)
    check_fits(bank, torch_model)
    wrong = ConceptBank([LayerSpec("0.attn1.to_q", "linear", 16, 9), LayerSpec("0.nope", "linear", 1, 1)], "ldm")
    with pytest.raises(
        BankMismatchError,
        match=r"2 of 2 layers differ: 0\.attn1\.to_q: bank 16x9, model 16x8; "
        r"0\.nope: missing",
    ):
        check_fits(wrong, forge_model)


def test_pasted_infotext_loses_this_banks_tags_only():
    params = {
        "Prompt": "a dog <lora:my_bank__sks:1> <lora:style:0.5> <lora:my_bank__zqx:0.7>",
        "Hires prompt": "<lora:my_bank__sks:1> hi",
        "SeqLoRA": "my_bank.safetensors: sks:1, zqx:0.7",
    }
    accordion.infotext_pasted("", params)
    assert params["Prompt"] == "a dog <lora:style:0.5>" and params["Hires prompt"] == "hi"
    untouched = {"Prompt": "a dog <lora:my_bank__sks:1>"}
    accordion.infotext_pasted("", untouched)
    assert untouched["Prompt"] == "a dog <lora:my_bank__sks:1>"


def test_infotext_fields_restore_enabled_bank_and_selection():
    enabled, bank, concepts = object(), object(), object()
    fields = dict(accordion.infotext_fields(enabled, bank, concepts))
    params = {"SeqLoRA": '"sub/b.safetensors: sks:1, !zqx:0.5"'}
    assert fields[enabled](params) is True
    assert fields[bank](params) == "sub/b.safetensors"
    assert fields[concepts](params) == "sks:1, !zqx:0.5"
    assert fields[enabled]({}) is False
    assert fields[enabled]({"SeqLoRA": "garbage"}) is False


def test_picker_html_carries_the_concepts_for_the_script():
    html = accordion.picker_html("b.safetensors", [{"name": 'a"<', "triggers": ["x"]}])
    assert 'data-bank="b.safetensors"' in html and "&quot;a\\&quot;&lt;&quot;" in html
    assert "seqlora-error" in accordion.picker_html("b", error="bad")


RUNNER = r"""
const fs = require('fs');
const vm = require('vm');
const ctx = {onUiUpdate: () => {}, gradioApp: () => null, console};
vm.createContext(ctx);
vm.runInContext(fs.readFileSync(process.argv[2], 'utf8'), ctx);
const cases = JSON.parse(process.argv[3]);
console.log(JSON.stringify(cases.map(c => {
    const items = ctx.seqloraParse(c);
    return [items.map(x => [x.name, x.strength, x.on]), ctx.seqloraFormat(items)];
})));
"""

CASES = ["", "dog", "dog:0.5, cat:1.25", "!dog:0.7, cat", " a b : 2 ,, !c:0 ", "x:y:0.3", "a\nb:2"]


@pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed")
def test_javascript_parses_and_formats_like_python(tmp_path):
    runner = tmp_path / "run.js"
    runner.write_text(RUNNER)
    out = subprocess.run(
        [NODE, str(runner), str(ROOT / "javascript" / "seqlora.js"), json.dumps(CASES)],
        capture_output=True,
        text=True,
        check=True,
    )
    for case, (items, formatted) in zip(CASES, json.loads(out.stdout), strict=True):
        assert [tuple(x) for x in items] == _core.parse_concepts(case), case
        assert formatted == _core.format_concepts(_core.parse_concepts(case)), case
