"""The demo end to end on the committed toy world (few steps: it checks the plumbing, not the learning)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from seqlora_core import ConceptBank
from seqlora_core.apps.cli import main

pytestmark = pytest.mark.slow  # trains models end to end


def test_demo_writes_grid_heatmap_summary_and_bank(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--concepts", "2", "--steps", "3", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["concepts"] == ["zqaa", "zqab"]
    for key in ("identity_after_own_training", "identity_at_end"):
        assert set(summary[key]) == {"zqaa", "zqab"}
        assert all(0.0 <= v <= 1.0 for v in summary[key].values())
    assert len(summary["identity_pairs"]) == 1 and summary["identity_pairs"][0]["pair"] == ["zqaa", "zqab"]
    bank = ConceptBank.load(out / "bank.safetensors")
    assert bank.names() == ["zqaa", "zqab"] and bank.architecture == "toy"
    grid = Image.open(out / "grid.png")
    assert grid.size[1] >= 6 * 32, "rows: 2 concepts x (after own, at end) + 1 pair + 2 prior rows"
    assert Image.open(out / "interference.png").size[0] > 50
    assert sorted(p.name for p in (out / "concepts").iterdir()) == ["zqaa", "zqab"]
