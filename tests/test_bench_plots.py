"""The bench helpers: Pillow charts (one coloured line per method, axes labelled) and the tables they
write into docs/benchmarks.md."""

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
            "interference_on_earlier": v / 10,
            "interference_on_earlier_std": 0.0,
        }
        for m, base in (("seqlora", 0.8), ("ortho_frozen", 0.3))
        for n, v in ((4, base), (8, base - 0.1))
    ]
    paths = plot_quality(summary, tmp_path / "q")
    assert [p.name for p in paths] == ["q_final_identity.png", "q_interference_on_earlier.png"]
    img = np.asarray(Image.open(paths[0]).convert("RGB"))
    for method in ("seqlora", "ortho_frozen"):
        assert (np.abs(img.astype(int) - COLOURS[method]).sum(-1) == 0).sum() > 50, method


def test_bench_tables_land_between_their_markers_in_docs_benchmarks(tmp_path):
    from _common import BENCHMARKS_DOC, update_tables

    text = BENCHMARKS_DOC.read_text()
    for tag in ("quality", "scale_101"):
        assert f"<!-- bench:{tag} -->" in text and f"<!-- /bench:{tag} -->" in text, tag
    doc = tmp_path / "b.md"
    doc.write_text("intro\n<!-- bench:q -->\nold\n<!-- /bench:q -->\nafter\n")
    assert update_tables("q", "| new |\n", doc)
    assert doc.read_text() == "intro\n<!-- bench:q -->\n| new |\n<!-- /bench:q -->\nafter\n"
    assert not update_tables("absent", "x", doc)


def test_a_run_at_another_rank_gets_a_line_of_its_own(tmp_path):
    rows = [("seqlora", 4, n, 0.8) for n in (4, 8)] + [("seqlora", 2, 64, 0.2)]
    summary = [{"method": m, "rank": r, "n": n, "final_identity": v, "final_identity_std": 0.0} for m, r, n, v in rows]
    img = np.asarray(Image.open(plot_quality(summary, tmp_path / "q")[0]).convert("RGB")).astype(int)
    darker = tuple(c // 2 for c in COLOURS["seqlora"])
    for colour in (COLOURS["seqlora"], darker):
        assert (np.abs(img - colour).sum(-1) == 0).sum() > 20, colour
