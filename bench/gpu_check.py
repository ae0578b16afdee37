"""One run on a CUDA machine: training and composition correct under bf16 autocast at SD1.5 scale, and the
speed ratios there.

1. Correctness on a full-depth SD1.5 UNet (random weights, fp32 parameters, bf16 autocast while training):
   two concepts one after another (losses finite, bases orthonormal and mutually orthogonal, protection
   recorded, ||dW|| / ||W|| moderate); composition merged and bypass give the same output, removing it
   restores the base output bit for bit; the composed output under bf16 autocast stays close to fp32;
   the kohya export read back gives the same weight changes.
2. Speed, side by side in one run: a SeqLoRA step against a plain LoRA step with 0, 10 and 100 concepts in
   the bank (median over steps, interleaved repeats), the upper level's share of a LoRA step, and the fixed
   cost per concept (statistics passes and basis init).
3. Composing 101 concepts, merged and bypass, and a sampling step with them.

    python bench/gpu_check.py --out DIR      # writes gpu_check_cuda.json there and into bench/results
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import sd15_unet, synthetic_bank, write_result
from step_overhead import interleaved, loss_fn, make_batches, time_steps

from seqlora_core import TrainConfig, compose, train_concept
from seqlora_core.interop.bank_lora import export_concept
from seqlora_core.interop.lora_read import read_lora_file


def check(name: str, ok: bool, detail: str, results: list[dict]) -> None:
    results.append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def correctness(unet, latent: int, steps: int, results: list[dict]) -> dict:
    batches = make_batches(latent, "cuda")
    bank = None
    for i, name in enumerate(("dog", "hat")):
        cfg = TrainConfig(
            name=name, triggers=[f"tok{i}"], rank=4, steps=steps, lr=2e-4, stats_batches=4, precision="auto", seed=i
        )
        t0 = time.perf_counter()
        bank = train_concept(
            unet, loss_fn, lambda s, i=i: batches(s + 1000 * i), cfg, bank, prior_batches=lambda s: batches(s + 5000)
        )
        c = bank.concepts[-1]
        finite = all(torch.isfinite(torch.tensor(c.loss_curve))) and all(
            bool(torch.isfinite(cl.B).all()) for cl in c.layers.values()
        )
        check(
            f"{name}: bf16 autocast training, losses and factors finite",
            finite,
            f"{steps} steps in {time.perf_counter() - t0:.1f} s, loss {c.loss_curve[0]:.4f} -> {c.loss_curve[-1]:.4f}",
            results,
        )
    worst_self = worst_cross = 0.0
    for spec in bank.layers:
        a = [c.layers[spec.name].A.double() for c in bank.concepts]
        worst_self = max(worst_self, max(float((x @ x.T - torch.eye(x.shape[0], dtype=x.dtype)).norm()) for x in a))
        if not any(c.layers[spec.name].soft for c in bank.concepts):
            worst_cross = max(worst_cross, float((a[0] @ a[1].T).abs().max()))
    check("bases orthonormal", worst_self < 1e-4, f"max ||A A^T - I|| = {worst_self:.2e}", results)
    check("bases mutually orthogonal", worst_cross < 1e-4, f"max |A_dog A_hat^T| = {worst_cross:.2e}", results)
    prot = [cl.protection for cl in bank.concepts[1].layers.values() if cl.protection]
    check(
        "protection recorded for the second concept",
        len(prot) == len(bank.layers),
        f"{len(prot)} of {len(bank.layers)} layers, mean protected directions "
        f"{statistics.mean(p['protected'] for p in prot) if prot else 0:.0f}",
        results,
    )
    ratio = bank.concepts[1].info.get("delta_norm_ratio", {})
    check(
        "weight change recorded",
        bool(ratio),
        f"||dW||/||W|| mean {ratio.get('mean', 0):.2e}, max {ratio.get('max', 0):.2e}",
        results,
    )

    b = batches(123)
    x = b["x0"]
    t = b["t"]
    text = b["text"]

    def out() -> torch.Tensor:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=text).sample.float()

    base = out()
    with compose(unet, bank, {"dog": 1.0, "hat": 0.8}, "merged"):
        merged = out()
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            merged_bf16 = unet(x, t, encoder_hidden_states=text).sample.float()
    restored = out()
    with compose(unet, bank, {"dog": 1.0, "hat": 0.8}, "bypass"):
        bypass = out()
    moved = float((merged - base).abs().max())
    diff = float((merged - bypass).abs().max())
    check(
        "merged == bypass (fp32)",
        diff <= 1e-3 * max(moved, 1e-6) + 1e-5,
        f"max |merged - bypass| {diff:.2e}, composition moved the output by {moved:.2e}",
        results,
    )
    check("remove() restores the base exactly", torch.equal(base, restored), "bitwise", results)
    rel = float((merged_bf16 - merged).norm() / merged.norm())
    check("bf16 autocast output close to fp32", rel < 0.05, f"relative difference {rel:.3e}", results)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dog.safetensors"
        export_concept(bank, "dog", path, dtype="fp32")
        pairs, _, _ = read_lora_file(path, "diffusers", module_names=[s.name for s in bank.layers])
        worst = max(
            float((up @ down - bank.concept("dog").delta(name)).abs().max()) for name, (down, up) in pairs.items()
        )
        check(
            "kohya export reads back to the same weight change",
            len(pairs) == len(bank.layers) and worst < 1e-6,
            f"{len(pairs)} of {len(bank.layers)} layers, max abs diff {worst:.2e}",
            results,
        )
    return {"losses_dog": bank.concepts[0].loss_curve, "timings": [c.timings for c in bank.concepts]}


def speed(unet, latent: int, steps: int, repeats: int, counts: list[int]) -> list[dict]:
    table = interleaved(
        unet,
        counts,
        repeats,
        lambda bank, method: time_steps(unet, bank, method, steps, latent, "cuda", precision="auto", stats_batches=2),
    )
    for r in table:
        print(
            f"bank {r['bank']:3d}: lora {r['lora_step_s'] * 1e3:.1f} ms, seqlora {r['seqlora_step_s'] * 1e3:.1f} ms "
            f"(x{r['ratio']:.3f}); upper level {r['upper_share_of_lora_step']:.1%} of a LoRA step; fixed cost "
            f"{r['seqlora_setup_s']:.1f} s vs {r['lora_setup_s']:.1f} s",
            flush=True,
        )
    return table


def composing(unet, latent: int, n: int = 101) -> dict:
    bank = synthetic_bank(unet, n)
    b = make_batches(latent, "cuda")(7)
    out = {}
    for mode in ("merged", "bypass"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        comp = compose(unet, bank, None, mode)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                unet(b["x0"], b["t"], encoder_hidden_states=b["text"])
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            for _ in range(10):
                unet(b["x0"], b["t"], encoder_hidden_states=b["text"])
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        comp.remove()
        out[mode] = {"compose_s": t1 - t0, "sampling_step_s": (t3 - t2) / 10}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            unet(b["x0"], b["t"], encoder_hidden_states=b["text"])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            unet(b["x0"], b["t"], encoder_hidden_states=b["text"])
        torch.cuda.synchronize()
    out["base_sampling_step_s"] = (time.perf_counter() - t0) / 10
    print(
        f"compose {n}: merged {out['merged']['compose_s']:.3f} s, bypass {out['bypass']['compose_s']:.3f} s; "
        f"sampling step base {out['base_sampling_step_s'] * 1e3:.1f} ms, merged "
        f"{out['merged']['sampling_step_s'] * 1e3:.1f} ms, bypass {out['bypass']['sampling_step_s'] * 1e3:.1f} ms",
        flush=True,
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--speed-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs one", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    results: list[dict] = []
    t0 = time.perf_counter()
    unet = sd15_unet(True, "cuda")
    print(
        f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; SD1.5 UNet "
        f"{sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters",
        flush=True,
    )
    payload: dict = {"how": __doc__, "latent": args.latent}
    payload["correctness"] = correctness(unet, args.latent, args.train_steps, results)
    payload["checks"] = results
    payload["speed"] = speed(unet, args.latent, args.speed_steps, args.repeats, [0, 10, 100])
    payload["compose_101"] = composing(unet, args.latent)
    payload["wall_s"] = time.perf_counter() - t0
    path = write_result("gpu_check_cuda", payload)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / path.name).write_text(path.read_text())
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"wrote {path}; {len(results) - len(failed)} of {len(results)} checks passed in {payload['wall_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
