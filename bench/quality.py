"""SeqLoRA against its baselines on the toy world: identity, forgetting, composition, prior preservation.

For every method and number of concepts N, concepts are learned one after another (the same concept
images and seeds for every method). After concept t is learned, the model a user would have then
(every concept so far composed) is asked for concept t alone, and at N = 4, 8, 16, 32 for every concept
j <= t: M[t][j] is the identity CNN's probability for j. From M: final average identity
(mean_j M[N-1][j]) and average forgetting (mean_j of j's best score, right after its training or at an
earlier checkpoint, minus M[N-1][j]). Also pairs of concepts in one prompt (scored per image half), how
far trigger-free prompts move from the base model (mean absolute pixel change, 0..1), the report's
interference and bound, wall time per concept, peak RSS and, for `fusion`, the time and memory of fusing.

    python bench/quality.py --quick      # minutes: N = 4, one seed
    python bench/quality.py              # N = 4, 8, 16, 32, three seeds (hours on a CPU)

A longer run can be split over processes with --n/--seeds/--tag and merged with --combine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, PeakRSS, bank_costs, parse_args, update_tables, write_result
from plots import plot_quality

from seqlora_core import build_report, compose
from seqlora_core.apps.bases import TOY, load_base
from seqlora_core.apps.recipes import TOY_LR as LR
from seqlora_core.apps.recipes import TOY_TRAIN as TRAIN
from seqlora_core.apps.recipes import learn_toy_concept
from seqlora_core.toy.evaluation import EvalSettings, concept_identity, pair_identity, sample
from seqlora_core.toy.identity import N_IDENTITY

STEPS = 150  # per concept: fewer than the demo's, so that the full grid fits in a few CPU hours
METHODS = ("seqlora", "lora", "sequential", "ortho_frozen", "joint", "fusion")
PRIOR_PROMPTS = (
    "a red circle on the left",
    "a blue square at the top and a green ring at the bottom",
    "a big yellow triangle in the center, black background",
)


def concept_ids(n: int, seed: int) -> list[int]:
    """Which toy concepts a run learns (a seeded choice among those the identity CNN knows)."""
    # a seeded order of all of them, cut at n: a shorter run learns a prefix of a longer one's concepts
    return random.Random(seed).sample(range(N_IDENTITY), N_IDENTITY)[:n]


CHECKPOINTS = (4, 8, 16, 32)


def average_forgetting(matrix: list[list[float | None]]) -> float:
    """mean_j (best identity of j, right after its training or at a checkpoint) - its final identity.

    Rows between checkpoints score only the newest concept, so the best is taken over the rows that score
    every concept (the checkpoints) plus j's own row; full matrices are read the same way.
    """
    n = len(matrix)
    rows = [t for t in range(n) if t + 1 in CHECKPOINTS or t + 1 == n]
    best = [max([matrix[j][j]] + [matrix[t][j] for t in rows if t >= j and matrix[t][j] is not None]) for j in range(n)]
    return statistics.mean(b - f for b, f in zip(best, matrix[-1], strict=True))


def checkpoint(
    pipe,
    bank,
    method: str,
    seed: int,
    matrix: list[list[float]],
    per_concept: list[dict],
    base_images,
    ev: EvalSettings,
) -> dict:
    """Every measure for the model as it is after the first ``len(matrix)`` concepts."""
    n = len(matrix)
    names = bank.names()
    final = matrix[-1]
    pairs = [(names[i], names[i + 1]) for i in range(0, n - 1, 2)]
    costs = bank_costs(pipe.unet, bank)
    pair_scores, _ = pair_identity(pipe, bank, pairs, ev)
    with compose(pipe.unet, bank, None, "merged"):
        after = sample(pipe, PRIOR_PROMPTS, ev)
    drift = statistics.mean(
        float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()) / 255
        for a, b in zip(base_images, after, strict=True)
    )
    rep = build_report(bank)
    offd = [rep["bound"][t][j] for t in range(n) for j in range(n) if t != j]
    return {
        "method": method,
        "n": n,
        "seed": seed,
        "concepts": names,
        "identity_matrix": [row[: t + 1] for t, row in enumerate(matrix)],
        "after_own": [matrix[j][j] for j in range(n)],
        "final_identity": statistics.mean(final),
        "average_forgetting": average_forgetting(matrix),
        "pair_identity": statistics.mean([(p["left"] + p["right"]) / 2 for p in pair_scores]) if pair_scores else None,
        "pairs": pair_scores,
        "prior_drift_pixels": drift,
        "mean_relative_interference": rep["mean_relative_interference"],
        "mean_relative_bound": statistics.mean(offd) if offd else 0.0,
        "train_s_per_concept": statistics.mean(p["train_s"] for p in per_concept),
        "peak_rss_max": max(p["peak_rss"] for p in per_concept),
        "per_concept": list(per_concept),
        "compose_s": costs["compose_s"],
        "compose_peak_rss": costs["compose_peak_rss"],
        "fusion_moment_bytes": costs["moment_bytes"],
        "bank_bytes": costs["bank_bytes"],
    }


def run(method: str, ns: list[int], seed: int, steps: int, ev: EvalSettings, data_dir: Path, lr: float, done: set[int]):
    """Learn max(ns) concepts one after another; yield the checkpoint row at each N in ``ns`` not in ``done``.

    The first N concepts of a longer run are exactly a run with N concepts (same concepts, order and
    seeds), so one run serves every N.
    """
    pipe = load_base(TOY)
    base_images = sample(pipe, PRIOR_PROMPTS, ev)
    bank = None
    matrix: list[list[float]] = []
    per_concept = []
    for t, k in enumerate(concept_ids(max(ns), seed)):
        with PeakRSS() as mem:
            # "k_seed" reads as a kohya `N_name` folder: each image counts max(k, 1) times per epoch, the
            # same sampling distribution as once; kept so that the recorded results reproduce
            bank = learn_toy_concept(pipe, bank, k, data_dir / f"{k}_{seed}", method, steps, lr, seed, **TRAIN)
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
        names = bank.names() if t + 1 in ns or t + 1 in CHECKPOINTS else bank.names()[-1:]
        scores, _ = concept_identity(pipe, bank, None, names, ev)
        matrix.append([scores.get(x) for x in bank.names()])
        if t + 1 in ns and t + 1 not in done:
            yield checkpoint(pipe, bank, method, seed, matrix, per_concept, base_images, ev)
        if all(n in done or n <= t + 1 for n in ns):
            return


def summarise(rows: list[dict]) -> list[dict]:
    keys = (
        "mean_after_own",
        "final_identity",
        "average_forgetting",
        "pair_identity",
        "prior_drift_pixels",
        "mean_relative_interference",
        "mean_relative_bound",
        "train_s_per_concept",
        "peak_rss_max",
        "compose_s",
        "fusion_moment_bytes",
    )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        r = r | {
            "mean_after_own": statistics.mean(r["after_own"]),
            "average_forgetting": average_forgetting(r["identity_matrix"]),
        }
        groups.setdefault((r["method"], r["n"]), []).append(r)
    out = []
    for (method, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        s = {"method": method, "n": n, "seeds": len(rs)}
        for k in keys:
            vals = [r[k] for r in rs if r[k] is not None]
            s[k] = statistics.mean(vals) if vals else None
            s[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(s)
    return out


def table(summary: list[dict]) -> str:
    """Markdown: mean (± standard deviation over seeds) per method and N."""
    cols = (
        ("mean_after_own", "identity after own training", 3),
        ("final_identity", "final identity", 3),
        ("average_forgetting", "avg forgetting", 3),
        ("pair_identity", "pair identity", 3),
        ("prior_drift_pixels", "prior drift", 3),
        ("mean_relative_interference", "interference", 3),
        ("mean_relative_bound", "bound", 3),
        ("train_s_per_concept", "s/concept", 1),
        ("compose_s", "compose s", 3),
    )
    lines = [
        "| N | method | seeds | " + " | ".join(c[1] for c in cols) + " | peak RSS MiB |",
        "|---" * (len(cols) + 4) + "|",
    ]
    for s in summary:
        cells = []
        for key, _, d in cols:
            v = s[key]
            cells.append(
                "n/a" if v is None else f"{v:.{d}f} ± {s[key + '_std']:.{d}f}" if s["seeds"] > 1 else f"{v:.{d}f}"
            )
        lines.append(
            f"| {s['n']} | {s['method']} | {s['seeds']} | "
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
    """Result JSON, markdown table and plots for ``rows``."""
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
    ap.add_argument("--quick", action="store_true", help="N = 4; one seed; two images per prompt")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", default=None, help="concept counts (default 4,8,16,32; quick: 4)")
    ap.add_argument("--seeds", default=None, help="seeds (default 0,1,2; quick: 0)")
    ap.add_argument("--steps", type=int, default=None, help=f"steps per concept (default {STEPS})")
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--tag", default=None, help="result file name (default quality or quality_quick)")
    ap.add_argument(
        "--combine",
        default=None,
        metavar="TAG,TAG",
        help="only merge the runs of these earlier tags into --tag's tables and plots",
    )
    args = parse_args(ap)
    tag = args.tag or ("quality_quick" if args.quick else "quality")
    steps = args.steps or STEPS
    ev = EvalSettings(seeds=2 if args.quick else 4)
    extra = {"steps": steps, "lr": args.lr, "train": TRAIN, "eval": vars(ev)}
    if args.combine:
        rows = [r for t in args.combine.split(",") for r in load_rows(t)]
        print(f"wrote {write_summary(tag, rows, extra | {'combined': args.combine.split(',')})}")
        return
    ns = sorted(int(x) for x in (args.n or ("4" if args.quick else "4,8,16,32")).split(","))
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = RESULTS / f"{tag}.partial.jsonl"
    rows = load_rows(tag) if partial.exists() else []
    done = {(r["method"], r["n"], r["seed"]) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for method in args.methods.split(","):
                have = {n for n in ns if (method, n, seed) in done}
                if len(have) == len(ns):
                    continue
                t0 = time.perf_counter()
                for r in run(method, ns, seed, steps, ev, Path(tmp), args.lr, have):
                    rows.append(r)
                    with partial.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(
                        f"N={r['n']:3d} seed {seed} {method:12s} final identity {r['final_identity']:.3f} "
                        f"forgetting {r['average_forgetting']:.3f} pairs {r['pair_identity'] or 0:.3f} "
                        f"drift {r['prior_drift_pixels']:.4f} interference {r['mean_relative_interference']:.4f} "
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
    path = write_summary(tag, rows, extra | {"n": ns, "seeds": seeds})
    partial.unlink(missing_ok=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
