"""Scale: 101 concepts on the toy world with `seqlora`, `ortho_frozen` and `fusion`.

Concepts are learned one after another (fewer steps each than the quality bench). Every `--every`
concepts it records: capacity used per layer (hard-orthogonal rank, and layers gone soft), bank size on
disk, peak process RSS while training, and the time and peak RSS of composing everything (for `fusion`
that is the least-squares fusion, whose n x n moments per concept and layer are counted too). At the end,
the identity of every concept the identity CNN knows (ids < 32, spread through the sequence) with all
101 composed.

    python bench/scale.py                 # 101 concepts, 40 steps each
    python bench/scale.py --concepts 30   # shorter
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from _common import parse_args, write_result
from quality import PeakRSS

from seqlora_core import build_report, compose
from seqlora_core.evaluate import EvalSettings, concept_identity, learn_toy_concept, toy_id
from seqlora_core.toy.model import load_toy_pipeline


def snapshot(pipe, bank, tmp: Path) -> dict:
    path = tmp / "bank.safetensors"
    bank.save(path)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        comp = compose(pipe.unet, bank, None, "merged")
        compose_s = time.perf_counter() - t0
        comp.remove()
    cap = build_report(bank)["capacity"]
    used = [v["used"] / v["total"] for v in cap.values()]
    return {
        "concepts": len(bank.concepts), "bank_bytes": path.stat().st_size, "compose_s": compose_s,
        "compose_peak_rss": mem.peak, "capacity_used_max": max(used), "capacity_used_mean": statistics.mean(used),
        "soft_layers": sum(1 for v in cap.values() if v["soft"]),
        "moment_bytes": sum(cl.moment.numel() * 4 for c in bank.concepts for cl in c.layers.values()
                            if cl.moment is not None),
    }


def run(method: str, n: int, steps: int, every: int, seed: int, tmp: Path) -> dict:
    pipe = load_toy_pipeline()
    order = random.Random(seed).sample(range(n), n)
    bank, snaps, rss = None, [], []
    for t, k in enumerate(order):
        with PeakRSS() as mem:
            bank = learn_toy_concept(pipe, bank, k, tmp / f"c{k}", method, steps, 3e-3, seed, images=6, stats_batches=2)
        rss.append(mem.peak)
        if (t + 1) % every == 0 or t + 1 == n:
            s = snapshot(pipe, bank, tmp)
            s["train_peak_rss"] = max(rss[-every:])
            s["train_s_last"] = bank.concepts[-1].timings["total_s"]
            snaps.append(s)
            print(f"{method:12s} {s['concepts']:3d} concepts: bank {s['bank_bytes'] / 2**20:7.1f} MiB, "
                  f"compose {s['compose_s']:.2f} s, train RSS {s['train_peak_rss'] / 2**20:.0f} MiB, "
                  f"capacity max {s['capacity_used_max']:.2f}, soft layers {s['soft_layers']}, "
                  f"moments {s['moment_bytes'] / 2**20:.0f} MiB", flush=True)
    scorable = [c.name for c in bank.concepts if toy_id(c) is not None]
    scores, _ = concept_identity(pipe, bank, None, scorable, EvalSettings(seeds=2))
    return {"method": method, "snapshots": snaps, "final_identity": statistics.mean(scores.values()),
            "scored_concepts": len(scorable), "identity": scores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=101)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--methods", default="seqlora,ortho_frozen,fusion")
    ap.add_argument("--seed", type=int, default=0)
    args = parse_args(ap)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            results.append(run(method, args.concepts, args.steps, args.every, args.seed, Path(tmp)))
            print(f"{method}: final identity of {results[-1]['scored_concepts']} scorable concepts "
                  f"{results[-1]['final_identity']:.3f}", flush=True)
    path = write_result(f"scale_{args.concepts}", {"how": __doc__, "steps": args.steps, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
