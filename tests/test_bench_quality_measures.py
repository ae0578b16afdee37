"""The quality benchmark's forgetting measures on hand-made identity matrices (row t: identities after
concept t + 1; None where a row between checkpoints did not score a concept)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from quality import average_forgetting, best_composed, share_kept, summarise  # noqa: E402

# five concepts: checkpoints at N = 4 (a full row) and the last row; rows 1, 2 and 5 score fewer
MATRIX = [
    [0.8],
    [None, 0.6],
    [None, None, 1.0],
    [0.4, 0.9, 0.5, 0.2],
    [0.2, 0.3, 0.5, 0.0, 0.0],
]


def test_best_is_taken_over_own_rows_and_checkpoints() -> None:
    assert best_composed(MATRIX) == [0.8, 0.9, 1.0, 0.2, 0.0]


def test_forgetting_and_share_kept() -> None:
    assert average_forgetting(MATRIX) == pytest.approx((0.6 + 0.6 + 0.5 + 0.2 + 0.0) / 5)
    assert share_kept(MATRIX) == pytest.approx(1.0 / 2.9)


def test_a_method_that_never_composes_forgets_little_and_keeps_nothing() -> None:
    never = [[0.1], [None, 0.0], [None, None, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    assert average_forgetting(never) == pytest.approx(0.02)
    assert share_kept(never) == 0.0
    assert share_kept([[0.0], [0.0, 0.0]]) is None


def test_a_budget_variant_is_summarised_apart_and_listed_after_its_method() -> None:
    def row(method: str, seed: int, identity: float) -> dict:
        return {"method": method, "n": 4, "rank": 4, "seed": seed, "final_identity": identity, "peak_rss_max": 1}

    rows = [
        row("lora", 0, 0.1),
        row("seqlora (budget 0.2)", 0, 0.5),
        row("seqlora (budget 0.2)", 1, 0.7),
        row("seqlora", 0, 0.3),
    ]
    summary = summarise(rows)
    assert [s["method"] for s in summary] == ["seqlora", "seqlora (budget 0.2)", "lora"]
    assert summary[1]["seeds"] == 2 and summary[1]["final_identity"] == pytest.approx(0.6)
