"""How SeqLoRA's settings trade learning against composition on the toy world: target presets, protection,
training context, learning rate. The defaults come from this table.

Each setting learns the same four toy concepts one after another (seed 0), then scores every concept alone
(only it composed) and with all four composed (identity CNN, chance 1/65), measures the prior drift (mean
absolute pixel change of trigger-free prompts that name their background, all four composed) and the
report's interference both ways. Settings run in parallel worker processes, one torch thread each.

    python bench/settings.py                  # the whole table (about an hour of CPU on this machine)
    python bench/settings.py --only mixed_0.9  # one row
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _common import RESULTS, update_tables, write_result

# name -> (method, TrainConfig overrides, lr or None for the recipe's); the rest as the toy recipe (rank 4, 250
# steps, 8 images)
SETTINGS: dict[str, tuple[str, dict, float | None]] = {
    "lora": ("lora", {"targets": "attn_ff"}, None),
    "v1_stacked": ("seqlora_v1", {"targets": "attn_ff"}, None),
    "stacked_0.9": ("seqlora", {"targets": "attn_ff", "context": "stacked", "protect_energy": 0.9}, None),
    "base_0.9": ("seqlora", {"targets": "attn_ff", "context": "base", "protect_energy": 0.9}, None),
    "mixed_off": ("seqlora", {"targets": "attn_ff", "context": "mixed", "protect": "off"}, None),
    "mixed_0.9": ("seqlora", {"targets": "attn_ff", "context": "mixed", "protect_energy": 0.9}, None),
    "mixed_0.99": ("seqlora", {"targets": "attn_ff", "context": "mixed", "protect_energy": 0.99}, None),
    "mixed_0.9_lr1.5e-2": ("seqlora", {"targets": "attn_ff", "context": "mixed", "protect_energy": 0.9}, 1.5e-2),
    "attn_mixed_0.9": ("seqlora", {"targets": "attn", "context": "mixed", "protect_energy": 0.9}, None),
    "cross_kv_mixed_0.9": ("seqlora", {"targets": "cross_kv", "context": "mixed", "protect_energy": 0.9}, None),
}
CONCEPTS = (0, 1, 2, 3)


def measure(name: str, data_dir: str) -> dict:
    """One setting: learn the concepts, score them, return the row."""
    import torch

    torch.set_num_threads(1)
    from seqlora_core import build_report
    from seqlora_core.apps.bases import TOY, load_base
    from seqlora_core.apps.recipes import TOY_LR, TOY_STEPS, learn_toy_concept
    from seqlora_core.toy.evaluation import PRIOR_PROMPTS, EvalSettings, concept_identity, prior_drift, sample

    method, overrides, lr = SETTINGS[name]
    lr = lr or TOY_LR
    ev = EvalSettings()
    pipe = load_base(TOY)
    base = sample(pipe, PRIOR_PROMPTS, ev)
    bank = None
    t0 = time.perf_counter()
    for k in CONCEPTS:
        bank = learn_toy_concept(
            pipe, bank, k, Path(data_dir) / f"c{k}", method, TOY_STEPS, lr, 0, **{"rank": 4, **overrides}
        )
    names = bank.names()
    alone = [concept_identity(pipe, bank, {n: 1.0}, [n], ev)[0][n] for n in names]
    composed = concept_identity(pipe, bank, None, names, ev)[0]
    rep = build_report(bank)
    ratios = [r["mean"] for r in rep["delta_norm_ratio"].values() if r]
    return {
        "setting": name,
        "method": method,
        "config": overrides,
        "lr": lr,
        "steps": TOY_STEPS,
        "identity_alone": alone,
        "identity_composed": [composed[n] for n in names],
        "mean_alone": statistics.mean(alone),
        "mean_composed": statistics.mean(composed.values()),
        "prior_drift_pixels": prior_drift(pipe, bank, ev, base_images=base),
        "interference_on_earlier": rep["mean_relative_interference_on_earlier"],
        "interference_on_later": rep["mean_relative_interference_on_later"],
        "delta_norm_ratio": statistics.mean(ratios) if ratios else None,
        "protected_mean": statistics.mean(p["protected_mean"] for p in rep["protection"].values())
        if rep["protection"]
        else 0.0,
        "seconds": time.perf_counter() - t0,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | method | targets | context | protect | lr | identity alone (each) | identity composed (each) "
        "| prior drift | interference on earlier / later | protected dims |",
        "|---" * 11 + "|",
    ]
    for r in rows:
        c = r["config"]
        protect = (
            "off"
            if c.get("protect") == "off" or r["method"] in ("lora", "seqlora_v1")
            else c.get("protect_energy", 0.9)
        )
        each = lambda v: " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
        lines.append(
            f"| {r['setting']} | {r['method']} | {c.get('targets')} | {c.get('context', 'default')} | {protect} | "
            f"{r['lr']:g} | {r['mean_alone']:.2f} ({each(r['identity_alone'])}) | {r['mean_composed']:.2f} "
            f"({each(r['identity_composed'])}) | {r['prior_drift_pixels']:.3f} | {r['interference_on_earlier']:.3f} / "
            f"{r['interference_on_later']:.3f} | {r['protected_mean']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated settings (default: all)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(SETTINGS)
    path = RESULTS / "settings.json"
    rows = {r["setting"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.workers) as pool:
        futures = {n: pool.submit(measure, n, str(Path(tmp) / n)) for n in names}
        for n, f in futures.items():
            rows[n] = f.result()
            r = rows[n]
            print(
                f"{n:22s} alone {r['mean_alone']:.2f} composed {r['mean_composed']:.2f} drift "
                f"{r['prior_drift_pixels']:.3f} ({r['seconds']:.0f} s)",
                flush=True,
            )
            ordered = [rows[k] for k in SETTINGS if k in rows]  # written after every row: a cut run keeps them
            write_result("settings", {"how": __doc__, "concepts": CONCEPTS, "rows": ordered})
            update_tables("settings", table(ordered))
    print(table(ordered))
    print("updated the settings table in docs/benchmarks.md")


if __name__ == "__main__":
    main()
