"""SeqLoRA against its ablations and baselines on the toy world: learning, keeping, composing, prior.

For every method and number of concepts N, concepts are learned one after another (the same concept
images and seeds for every method). After concept t is learned, the model a user would have then (every
concept so far composed) is asked for concept t; at the checkpoints (N = 4, 8, 16, 32, 64) every concept j
is scored twice: alone (only j composed: did it learn?) and with every concept composed (does it compose?).
Identity is the toy identity CNN's probability for the prompted concept (chance 1/65). From those:

- identity alone and all composed (means over the concepts);
- average forgetting: mean_j of j's best all-composed score (right after its training or at an earlier
  checkpoint) minus its final one;
- pairs: "A on the left and B on the right", each half scored;
- prior drift: mean absolute pixel change (0..1) of trigger-free prompts that name their background,
  every concept composed, against the base model;
- interference both ways from the bank's report (a new concept on earlier ones; earlier concepts on a new
  one), ||dW|| / ||W||, the share of concepts whose interference budget was met;
- the forgetting bound's exceedance on held-out real activations (new views and noise of each concept,
  every concept composed): per layer and ordered pair the share of inputs above the bound at delta = 0.05,
  and the share of (layer, pair) cases where that stays <= delta;
- wall time per concept and peak RSS; for `fusion`, the time and memory of fusing.

    python bench/quality.py --quick                # N = 4, one seed, three methods (v2, v1, frozen A)
    python bench/quality.py                        # every method, N = 4, 8, 16, 32, three seeds (hours)
    python bench/quality.py --n 64 --rank 2 --tag quality_n64

A run to N learns the first concepts of a longer one exactly, so one run serves every smaller N. Runs
can be split over processes (--methods, --seeds, --n, --tag) and merged with --combine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from _common import RESULTS, PeakRSS, bank_costs, parse_args, update_tables, write_result
from plots import plot_quality

from seqlora_core import build_report
from seqlora_core.apps.bases import TOY, load_base
from seqlora_core.apps.recipes import TOY_LR, TOY_STEPS, TOY_TRAIN, learn_toy_concept
from seqlora_core.method.report import bound_exceedance
from seqlora_core.toy.evaluation import (
    PRIOR_PROMPTS,
    EvalSettings,
    concept_identity,
    held_out_rows,
    pair_identity,
    prior_drift,
    sample,
)
from seqlora_core.toy.identity import N_IDENTITY

METHODS = ("seqlora", "seqlora_v1", "frozen_a", "lora", "sequential", "ortho_frozen", "joint", "fusion")
QUICK_METHODS = ("seqlora", "seqlora_v1", "frozen_a")
CHECKPOINTS = (4, 8, 16, 32, 64)


def concept_ids(n: int, seed: int) -> list[int]:
    """Which toy concepts a run learns: a seeded order of all the identity CNN knows, cut at n (a shorter
    run learns a prefix of a longer one's concepts)."""
    return random.Random(seed).sample(range(N_IDENTITY), N_IDENTITY)[:n]


def best_composed(matrix: list[list[float | None]]) -> list[float]:
    """Each concept's best all-composed identity: right after its training or at a checkpoint.

    Rows between checkpoints score only the newest concept, so the best is taken over the rows that score
    every concept plus j's own row."""
    n = len(matrix)
    rows = [t for t in range(n) if t + 1 in CHECKPOINTS or t + 1 == n]
    return [max([matrix[j][j]] + [matrix[t][j] for t in rows if t >= j and matrix[t][j] is not None]) for j in range(n)]


def average_forgetting(matrix: list[list[float | None]]) -> float:
    """mean_j (best all-composed identity of j) - its final one (see ``best_composed``)."""
    return statistics.mean(b - f for b, f in zip(best_composed(matrix), matrix[-1], strict=True))


def share_kept(matrix: list[list[float | None]]) -> float | None:
    """sum_j final all-composed identity / sum_j best one: how much of what the concepts ever showed together
    is left at the end. Forgetting alone favours a method whose concepts never compose (nothing to lose);
    this does not. None when no concept ever scored."""
    best = sum(best_composed(matrix))
    return sum(matrix[-1]) / best if best > 0 else None


def checkpoint(pipe, bank, method: str, seed: int, matrix, per_concept, base_images, ev, held_dir: Path) -> dict:
    """Every measure for the model as it is after the first ``len(matrix)`` concepts."""
    n = len(matrix)
    names = bank.names()
    alone = {}
    for name in names:
        scores, _ = concept_identity(pipe, bank, {name: 1.0}, [name], ev)
        alone[name] = scores[name]
    pairs = [(names[i], names[i + 1]) for i in range(0, n - 1, 2)]
    pair_scores, _ = pair_identity(pipe, bank, pairs, ev)
    costs = bank_costs(pipe.unet, bank)
    rep = build_report(bank)
    offd = [rep["bound"][t][j] for t in range(n) for j in range(n) if t != j]
    ratios = [r["mean"] for r in rep["delta_norm_ratio"].values() if r]
    budgets = list(rep["budget"].values())
    t0 = time.perf_counter()
    exceed = bound_exceedance(bank, held_out_rows(pipe, bank, held_dir, seed=seed + 777))
    return {
        "method": method,
        "n": n,
        "seed": seed,
        "concepts": names,
        "identity_matrix": [row[: t + 1] for t, row in enumerate(matrix)],
        "identity_alone": [alone[x] for x in names],
        "after_own": [matrix[j][j] for j in range(n)],
        "mean_identity_alone": statistics.mean(alone.values()),
        "final_identity": statistics.mean(matrix[-1]),
        "average_forgetting": average_forgetting(matrix),
        "share_kept": share_kept(matrix),
        "pair_identity": statistics.mean([(p["left"] + p["right"]) / 2 for p in pair_scores]) if pair_scores else None,
        "pairs": pair_scores,
        "prior_drift_pixels": prior_drift(pipe, bank, ev, base_images=base_images),
        "mean_relative_interference": rep["mean_relative_interference"],
        "interference_on_earlier": rep["mean_relative_interference_on_earlier"],
        "interference_on_later": rep["mean_relative_interference_on_later"],
        "mean_relative_bound": statistics.mean(offd) if offd else 0.0,
        "delta_norm_ratio": statistics.mean(ratios) if ratios else None,
        "budget_met": sum(b["met"] for b in budgets) / len(budgets) if budgets else None,
        "bound_exceedance": exceed,
        "bound_within_delta": exceed["within_delta"],
        "exceedance_s": time.perf_counter() - t0,
        "train_s_per_concept": statistics.mean(p["train_s"] for p in per_concept),
        "peak_rss_max": max(p["peak_rss"] for p in per_concept),
        "per_concept": list(per_concept),
        "compose_s": costs["compose_s"],
        "compose_peak_rss": costs["compose_peak_rss"],
        "fusion_moment_bytes": costs["moment_bytes"],
        "bank_bytes": costs["bank_bytes"],
    }


def train_settings(rank: int, budget: float | None) -> dict:
    """The toy training settings of a run: the recipe's, at ``rank``, with ``budget`` when given."""
    return TOY_TRAIN | {"rank": rank} | ({} if budget is None else {"budget": budget})


def variant_label(method: str, budget: float | None) -> str:
    """The method's name in the rows: "seqlora", or "seqlora (budget 0.2)" at another budget."""
    return method if budget is None else f"{method} (budget {budget:g})"


def run(
    method: str,
    ns: list[int],
    seed: int,
    steps: int,
    lr: float,
    rank: int,
    ev: EvalSettings,
    data_dir: Path,
    done: set[int],
    device: str = "cpu",
    budget: float | None = None,
):
    """Learn max(ns) concepts one after another; yield the checkpoint row at each N in ``ns`` not in ``done``.
    With ``budget``, the rows' method is labelled "method (budget eps)"."""
    pipe = load_base(TOY, device)
    base_images = sample(pipe, PRIOR_PROMPTS, ev)
    train = train_settings(rank, budget)
    label = variant_label(method, budget)
    bank = None
    matrix: list[list[float | None]] = []
    per_concept = []
    for t, k in enumerate(concept_ids(max(ns), seed)):
        with PeakRSS() as mem:
            bank = learn_toy_concept(pipe, bank, k, data_dir / f"c{k}_s{seed}", method, steps, lr, seed, **train)
        c = bank.concepts[-1]
        per_concept.append(
            {
                "name": c.name,
                "train_s": c.timings["total_s"],
                "peak_rss": mem.peak,
                "upper_s": c.timings.get("upper_s", 0.0),
            }
        )
        # every concept so far at the checkpoints; in between only the new one (its identity after training)
        scored = bank.names() if t + 1 in ns or t + 1 in CHECKPOINTS else bank.names()[-1:]
        scores, _ = concept_identity(pipe, bank, None, scored, ev)
        matrix.append([scores.get(x) for x in bank.names()])
        if t + 1 in ns and t + 1 not in done:
            yield checkpoint(pipe, bank, label, seed, matrix, per_concept, base_images, ev, data_dir / "held_out")
        if all(n in done or n <= t + 1 for n in ns):
            return


SUMMARY_KEYS = (
    "mean_identity_alone",
    "final_identity",
    "average_forgetting",
    "share_kept",
    "pair_identity",
    "prior_drift_pixels",
    "interference_on_earlier",
    "interference_on_later",
    "delta_norm_ratio",
    "budget_met",
    "bound_within_delta",
    "train_s_per_concept",
    "peak_rss_max",
    "compose_s",
    "fusion_moment_bytes",
)


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["n"], r.get("rank", 4)), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}

    def rank_of(method: str) -> tuple[int, str]:  # a variant ("seqlora (budget 0.2)") right after its method
        return order.get(method.split(" (")[0], len(order)), method

    out = []
    for (method, n, rank), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], rank_of(kv[0][0]))):
        s = {"method": method, "n": n, "rank": rank, "seeds": len(rs)}
        for k in SUMMARY_KEYS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            s[k] = statistics.mean(vals) if vals else None
            s[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(s)
    return out


TABLE_COLUMNS = (
    ("mean_identity_alone", "identity alone", 3),
    ("final_identity", "identity, all composed", 3),
    ("average_forgetting", "avg forgetting", 3),
    ("share_kept", "kept of best", 2),
    ("pair_identity", "pair identity", 3),
    ("prior_drift_pixels", "prior drift", 3),
    ("interference_on_earlier", "interference on earlier", 3),
    ("interference_on_later", "interference on later", 3),
    ("delta_norm_ratio", "dW/W", 3),
    ("bound_within_delta", "bound holds (cases)", 2),
    ("train_s_per_concept", "s/concept", 1),
)


def table(summary: list[dict]) -> str:
    """Markdown: mean (± standard deviation over seeds) per method, N and rank."""
    lines = [
        "| N | rank | method | seeds | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " | peak RSS MiB |",
        "|---" * (len(TABLE_COLUMNS) + 5) + "|",
    ]
    for s in summary:
        cells = []
        for key, _, d in TABLE_COLUMNS:
            v = s[key]
            cells.append(
                "n/a" if v is None else f"{v:.{d}f} ± {s[key + '_std']:.{d}f}" if s["seeds"] > 1 else f"{v:.{d}f}"
            )
        lines.append(
            f"| {s['n']} | {s['rank']} | {s['method']} | {s['seeds']} | "
            + " | ".join(cells)
            + f" | {s['peak_rss_max'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def load_rows(tag: str) -> list[dict]:
    """The runs recorded under ``tag``: its finished result file, else its partial lines."""
    done, partial = RESULTS / f"{tag}.json", RESULTS / f"{tag}.partial.jsonl"
    if done.exists():
        return json.loads(done.read_text())["runs"]
    return [json.loads(line) for line in partial.read_text().splitlines()] if partial.exists() else []


def write_summary(tag: str, rows: list[dict], extra: dict) -> Path:
    """Result JSON, markdown table and plots for ``rows`` (measures added since a row was written are
    derived from its identity matrix)."""
    for r in rows:
        if "share_kept" not in r:
            r["share_kept"] = share_kept(r["identity_matrix"])
    summary = summarise(rows)
    print("\n" + table(summary))
    path = write_result(tag, {"how": __doc__, **extra, "summary": summary, "runs": rows})
    (RESULTS / f"{tag}.md").write_text(table(summary) + "\n")
    if update_tables(tag, table(summary)):
        print(f"updated the {tag} table in docs/benchmarks.md")
    for png in plot_quality(summary, RESULTS / tag):
        print(f"wrote {png}")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"N = 4, one seed, {', '.join(QUICK_METHODS)}")
    ap.add_argument("--methods", default=None, help=f"comma-separated (default: all of {', '.join(METHODS)})")
    ap.add_argument("--n", default=None, help="concept counts (default 4,8,16,32; quick: 4)")
    ap.add_argument("--seeds", default=None, help="seeds (default 0,1,2; quick: 0)")
    ap.add_argument("--steps", type=int, default=TOY_STEPS, help=f"steps per concept (default {TOY_STEPS})")
    ap.add_argument("--lr", type=float, default=TOY_LR)
    ap.add_argument("--rank", type=int, default=TOY_TRAIN["rank"])
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="interference budget eps of the constrained methods (default: TrainConfig's); the rows are "
        'labelled "method (budget eps)"',
    )
    ap.add_argument("--tag", default=None, help="result file name (default quality or quality_quick)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--combine",
        default=None,
        metavar="TAG,TAG",
        help="only merge the runs of these earlier tags into --tag's tables and plots",
    )
    args = parse_args(ap)
    tag = args.tag or ("quality_quick" if args.quick else "quality")
    ev = EvalSettings(seeds=4)
    extra = {"steps": args.steps, "lr": args.lr, "train": train_settings(args.rank, args.budget), "eval": vars(ev)}
    if args.combine:
        rows = [r for t in args.combine.split(",") for r in load_rows(t)]
        print(f"wrote {write_summary(tag, rows, extra | {'combined': args.combine.split(',')})}")
        return
    methods = (args.methods or ",".join(QUICK_METHODS if args.quick else METHODS)).split(",")
    ns = sorted(int(x) for x in (args.n or ("4" if args.quick else "4,8,16,32")).split(","))
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = RESULTS / f"{tag}.partial.jsonl"
    rows = load_rows(tag) if partial.exists() else []
    done = {(r["method"], r["n"], r["seed"]) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for method in methods:
                have = {n for n in ns if (variant_label(method, args.budget), n, seed) in done}
                if len(have) == len(ns):
                    continue
                t0 = time.perf_counter()
                for r in run(
                    method, ns, seed, args.steps, args.lr, args.rank, ev, Path(tmp), have, args.device, args.budget
                ):
                    r["rank"] = args.rank
                    r["device"] = args.device
                    rows.append(r)
                    with partial.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(
                        f"N={r['n']:3d} seed {seed} {method:12s} alone {r['mean_identity_alone']:.3f} "
                        f"composed {r['final_identity']:.3f} forgetting {r['average_forgetting']:.3f} "
                        f"pairs {r['pair_identity'] or 0:.3f} drift {r['prior_drift_pixels']:.4f} "
                        f"interference {r['interference_on_earlier']:.3f}/{r['interference_on_later']:.3f} "
                        f"dW/W {r['delta_norm_ratio'] or 0:.3f} bound ok {r['bound_within_delta']:.2f} "
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
    path = write_summary(tag, rows, extra | {"n": ns, "seeds": seeds, "methods": methods})
    partial.unlink(missing_ok=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
