"""Scale: 101 concepts on the toy world with `seqlora`, `ortho_frozen` and `fusion`.

Concepts are learned one after another (fewer steps each than the quality bench). Every `--every`
concepts it records: capacity used per layer (hard-orthogonal rank, and layers gone soft), bank size on
disk, peak process RSS while training, and the time and peak RSS of composing everything (for `fusion`
that is the least-squares fusion, whose n x n moments per concept and layer are counted too). At the end,
the identity of every concept the identity CNN knows (ids < 32, spread through the sequence) with all
101 composed.

    python bench/scale.py                 # 101 concepts, 20 steps each
    python bench/scale.py --concepts 30   # shorter
    python bench/scale.py --methods fusion --tag scale_fusion   # one method per process, then
    python bench/scale.py --tag scale_101 --combine scale_seqlora,scale_fusion
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch
from _common import RESULTS, PeakRSS, bank_costs, parse_args, sd15_unet, update_tables, write_result
from plots import line_chart

from seqlora_core import build_report
from seqlora_core.apps.bases import TOY, load_base
from seqlora_core.apps.recipes import TOY_LR as LR
from seqlora_core.apps.recipes import TOY_TRAIN as TRAIN
from seqlora_core.apps.recipes import learn_toy_concept
from seqlora_core.method.methods import get_method
from seqlora_core.method.targets import find_targets
from seqlora_core.toy.evaluation import EvalSettings, concept_identity, toy_id


def snapshot(pipe, bank) -> dict:
    cap = build_report(bank)["capacity"]
    used = [v["used"] / v["total"] for v in cap.values()]
    return {
        "concepts": len(bank.concepts),
        **bank_costs(pipe.unet, bank),
        "capacity_used_max": max(used),
        "capacity_used_mean": statistics.mean(used),
        "soft_layers": sum(1 for v in cap.values() if v["soft"]),
    }


def sd15_moment_bytes_per_concept(targets: str = "attn") -> int:
    """Bytes of the n x n fp32 input moments `fusion` keeps per concept on SD1.5's own layer shapes
    (counted from the layers of an SD1.5-config UNet built on the meta device, so no weights are made)."""
    with torch.device("meta"):
        unet = sd15_unet(full=True, device="meta")
    return sum(spec.in_features**2 * 4 for spec in find_targets(unet, targets))


def run(method: str, n: int, steps: int, every: int, seed: int, tmp: Path) -> dict:
    pipe = load_base(TOY)
    order = random.Random(seed).sample(range(n), n)
    bank, snaps, rss = None, [], []
    for t, k in enumerate(order):
        with PeakRSS() as mem:
            bank = learn_toy_concept(
                pipe, bank, k, tmp / f"c{k}", method, steps, LR, seed, images=6, stats_batches=2, **TRAIN
            )
        rss.append(mem.peak)
        if (t + 1) % every == 0 or t + 1 == n:
            s = snapshot(pipe, bank)
            s["train_peak_rss"] = max(rss[-every:])
            s["train_s_last"] = bank.concepts[-1].timings["total_s"]
            snaps.append(s)
            print(
                f"{method:12s} {s['concepts']:3d} concepts: bank {s['bank_bytes'] / 2**20:7.1f} MiB, "
                f"compose {s['compose_s']:.2f} s, train RSS {s['train_peak_rss'] / 2**20:.0f} MiB, "
                f"capacity max {s['capacity_used_max']:.2f}, soft layers {s['soft_layers']}, "
                f"moments {s['moment_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )
    scorable = [c.name for c in bank.concepts if toy_id(c) is not None]
    scores, _ = concept_identity(pipe, bank, None, scorable, EvalSettings(seeds=2))
    return {
        "method": method,
        "snapshots": snaps,
        "final_identity": statistics.mean(scores.values()),
        "scored_concepts": len(scorable),
        "identity": scores,
    }


def table(results: list[dict]) -> str:
    """Markdown: one row per method and snapshot."""
    lines = [
        "| method | concepts | bank on disk MiB | peak RSS training MiB | compose s | peak RSS composing MiB "
        "| capacity used (max / mean) | layers soft | stored moments MiB |",
        "|---" * 9 + "|",
    ]
    for r in results:
        free = get_method(r["method"]).basis == "free"  # no orthogonality: capacity does not apply
        for s in r["snapshots"]:
            capacity = "n/a" if free else f"{s['capacity_used_max']:.2f} / {s['capacity_used_mean']:.2f}"
            lines.append(
                f"| {r['method']} | {s['concepts']} | {s['bank_bytes'] / 2**20:.1f} | "
                f"{s['train_peak_rss'] / 2**20:.0f} | {s['compose_s']:.3f} | "
                f"{s['compose_peak_rss'] / 2**20:.0f} | "
                f"{capacity} | {s['soft_layers'] if capacity != 'n/a' else 'n/a'} | "
                f"{s['moment_bytes'] / 2**20:.1f} |"
            )
    lines.append("")
    lines.append("| method | final identity, all composed (concepts scored) |")
    lines.append("|---|---|")
    for r in results:
        lines.append(f"| {r['method']} | {r['final_identity']:.3f} ({r['scored_concepts']}) |")
    return "\n".join(lines)


def plots(results: list[dict], prefix: Path) -> list[Path]:
    out = []
    for key, label in (
        ("train_peak_rss", "peak RSS while training (MiB)"),
        ("bank_bytes", "bank on disk (MiB)"),
        ("compose_peak_rss", "peak RSS while composing (MiB)"),
    ):
        series = {r["method"]: [(s["concepts"], s[key] / 2**20, 0.0) for s in r["snapshots"]] for r in results}
        out.append(line_chart(series, label, "concepts in the bank", "MiB", Path(f"{prefix}_{key}.png")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=101)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--methods", default="seqlora,ortho_frozen,fusion")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=None, help="result file name (default scale_<concepts>)")
    ap.add_argument(
        "--combine",
        default=None,
        metavar="TAG,TAG",
        help="only merge the results of these earlier tags into --tag's table and plots",
    )
    args = parse_args(ap)
    tag = args.tag or f"scale_{args.concepts}"
    if args.combine:
        results = [
            r for t in args.combine.split(",") for r in json.loads((RESULTS / f"{t}.json").read_text())["results"]
        ]
    else:
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for method in args.methods.split(","):
                results.append(run(method, args.concepts, args.steps, args.every, args.seed, Path(tmp)))
                print(
                    f"{method}: final identity of {results[-1]['scored_concepts']} scorable concepts "
                    f"{results[-1]['final_identity']:.3f}",
                    flush=True,
                )
    sd15 = sd15_moment_bytes_per_concept(TRAIN["targets"])
    fusion_note = (
        f"`fusion` keeps an n x n input moment per concept and layer: on SD1.5's own layer shapes "
        f"(targets `{TRAIN['targets']}`) that is {sd15 / 2**20:.1f} MiB per concept, "
        f"{sd15 * args.concepts / 2**30:.2f} GiB for {args.concepts} concepts (fp32), "
        "against nothing for SeqLoRA."
    )
    print(fusion_note)
    path = write_result(
        tag,
        {
            "how": __doc__,
            "steps": args.steps,
            "train": TRAIN,
            "lr": LR,
            "results": results,
            "sd15_fusion_moment_bytes_per_concept": sd15,
        },
    )
    md = table(results) + "\n\n" + fusion_note + "\n"
    (RESULTS / f"{tag}.md").write_text(md)
    for png in plots(results, RESULTS / tag):
        print(f"wrote {png}")
    if update_tables(tag, md):
        print(f"updated the {tag} table in docs/benchmarks.md")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
