"""The bench's Pillow charts: one coloured line per method, axes labelled, written as PNG."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from plots import COLOURS, plot_quality  # noqa: E402


def test_quality_plots_draw_every_method(tmp_path):
    summary = [
        {
            "method": m,
            "n": n,
            "final_identity": v,
            "final_identity_std": 0.05,
            "average_forgetting": None,
            "average_forgetting_std": 0.0,
            "mean_relative_interference": v / 10,
            "mean_relative_interference_std": 0.0,
        }
        for m, base in (("seqlora", 0.8), ("ortho_frozen", 0.3))
        for n, v in ((4, base), (8, base - 0.1))
    ]
    paths = plot_quality(summary, tmp_path / "q")
    assert [p.name for p in paths] == ["q_final_identity.png", "q_mean_relative_interference.png"]
    img = np.asarray(Image.open(paths[0]).convert("RGB"))
    for method in ("seqlora", "ortho_frozen"):
        assert (np.abs(img.astype(int) - COLOURS[method]).sum(-1) == 0).sum() > 50, method
