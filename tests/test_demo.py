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
    for key in ("identity_alone", "identity_all_composed", "identity_right_after_training"):
        assert set(summary[key]) == {"zqaa", "zqab"}
        assert all(0.0 <= v <= 1.0 for v in summary[key].values())
    assert 0.0 <= summary["prior_drift_pixels"] <= 1.0 and summary["settings"]["steps"] == 3
    assert len(summary["identity_pairs"]) == 1 and summary["identity_pairs"][0]["pair"] == ["zqaa", "zqab"]
    bank = ConceptBank.load(out / "bank.safetensors")
    assert bank.names() == ["zqaa", "zqab"] and bank.architecture == "toy"
    grid = Image.open(out / "grid.png")
    assert grid.size[1] >= 5 * 3 * 32, "rows: 2 concepts + 1 pair + 2 trigger-free prompts, images 3x"
    assert Image.open(out / "interference.png").size[0] > 50
    assert sorted(p.name for p in (out / "concepts").iterdir()) == ["zqaa", "zqab"]
