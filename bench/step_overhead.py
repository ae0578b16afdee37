"""Speed ratio of a SeqLoRA training step to a plain LoRA step, with 0, 10 and 100 concepts in the bank.

Both run in the same engine on the same SD1.5-width denoiser (random weights), side by side, interleaved
(A B A B ...), so machine noise hits both alike. Per-step wall time is the median over steps after the
first (which warms up), taken from the trainer's step callback (a loss read-out, so CUDA is synchronised).
The forward/backward pass is the same code for both; SeqLoRA adds the upper level (projections, penalty,
QR), timed inside the trainer and also given as a share of the plain LoRA step: on a busy machine that
share is steadier than the ratio of two noisy step times.

    python bench/step_overhead.py            # CPU: SD1.5 widths, one layer per block, 128 px
    python bench/step_overhead.py --full     # full SD1.5 depth (use on CUDA: 512 px)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import parse_args, sd15_unet, synthetic_bank, write_result

from seqlora_core import TrainCallbacks, TrainConfig, train_concept


def make_batches(latent: int, device: str):
    def fn(step: int) -> dict:
        g = torch.Generator().manual_seed(step)
        return {
            "x0": torch.randn(1, 4, latent, latent, generator=g).to(device),
            "noise": torch.randn(1, 4, latent, latent, generator=g).to(device),
            "t": torch.randint(0, 1000, (1,), generator=g).to(device),
            "text": torch.randn(1, 77, 768, generator=g).to(device),
        }

    return fn


def loss_fn(unet, b):
    a = (1 - b["t"].float() / 1000).view(-1, 1, 1, 1)
    xt = a.sqrt() * b["x0"] + (1 - a).sqrt() * b["noise"]
    pred = unet(xt, b["t"], encoder_hidden_states=b["text"]).sample
    return torch.nn.functional.mse_loss(pred.float(), b["noise"])


def time_steps(
    unet, bank, method: str, steps: int, latent: int, device: str, precision: str = "auto", stats_batches: int = 1
) -> dict:
    """One timed training of ``steps`` steps: median step, upper level per step, the fixed cost around them."""
    stamps: list[float] = []
    cb = TrainCallbacks(on_step=lambda info: stamps.append(time.perf_counter()))
    cfg = TrainConfig(
        name="new", method=method, rank=4, steps=steps, lr=1e-4, stats_batches=stats_batches, precision=precision
    )
    batches = make_batches(latent, device)
    t0 = time.perf_counter()
    new_bank = train_concept(unet, loss_fn, batches, cfg, bank, callbacks=cb)
    total = time.perf_counter() - t0
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    tm = new_bank.concepts[-1].timings
    return {
        "step_s": statistics.median(per_step),
        "upper_s_per_step": tm["upper_s"] / steps,
        "setup_s": total - (stamps[-1] - stamps[0]) - per_step[0] if per_step else total,
    }


def interleaved(unet, counts: list[int], repeats: int, run) -> list[dict]:
    """``run(bank, method)`` -> :func:`time_steps`'s dict for every bank size and both methods, interleaved
    (A B A B ...) ``repeats`` times; one row of medians per bank size."""
    banks = {n: (synthetic_bank(unet, n) if n else None) for n in counts}
    rows: dict[tuple[int, str], list[dict]] = {}
    for rep in range(repeats):
        for n in counts:
            for method in ("lora", "seqlora"):
                r = run(banks[n], method)
                rows.setdefault((n, method), []).append(r)
                print(
                    f"repeat {rep} bank {n:3d} {method:8s} step {r['step_s'] * 1000:8.1f} ms  "
                    f"(upper level {r['upper_s_per_step'] * 1000:6.1f} ms, setup {r['setup_s']:.1f} s)",
                    flush=True,
                )

    def med(n: int, method: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[(n, method)])

    table = []
    for n in counts:
        lo, sq, up = med(n, "lora", "step_s"), med(n, "seqlora", "step_s"), med(n, "seqlora", "upper_s_per_step")
        table.append(
            {
                "bank": n,
                "lora_step_s": lo,
                "seqlora_step_s": sq,
                "ratio": sq / lo,
                "upper_step_s": up,
                "upper_share_of_lora_step": up / lo,
                "lora_setup_s": med(n, "lora", "setup_s"),
                "seqlora_setup_s": med(n, "seqlora", "setup_s"),
            }
        )
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full SD1.5 depth (two layers per block)")
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 16 on CPU, 64 on CUDA)")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed run (the first is warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every (bank, method)")
    ap.add_argument("--banks", default="0,10,100", help="concept counts in the bank")
    args = parse_args(ap)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    latent = args.latent or (64 if device == "cuda" else 16)
    unet = sd15_unet(args.full, device)
    counts = [int(x) for x in args.banks.split(",")]
    table = interleaved(
        unet, counts, args.repeats, lambda bank, method: time_steps(unet, bank, method, args.steps, latent, device)
    )
    print(
        f"\nSD1.5-width UNet ({'full' if args.full else 'one layer per block'}), {device}, latent {latent}x{latent}, "
        f"batch 1, rank 4, attention projections; median step over {args.steps - 1} steps x {args.repeats} repeats"
    )
    print(f"{'bank':>5} {'lora ms':>9} {'seqlora ms':>11} {'ratio':>7} {'upper ms':>9} {'upper/lora step':>16}")
    for r in table:
        lo, sq, up = r["lora_step_s"], r["seqlora_step_s"], r["upper_step_s"]
        print(f"{r['bank']:5d} {lo * 1000:9.1f} {sq * 1000:11.1f} {sq / lo:7.3f} {up * 1000:9.1f} {up / lo:16.3f}")
    path = write_result(
        f"step_overhead_{device}{'_full' if args.full else ''}",
        {
            "how": "median per-step wall time between step callbacks, interleaved lora/seqlora runs",
            "full_depth": args.full,
            "latent": latent,
            "steps": args.steps,
            "repeats": args.repeats,
            "rows": table,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
