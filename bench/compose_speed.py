"""Composing 101 concepts (merged and bypass) against loading one ordinary LoRA; sampling cost of bypass.

Same SD1.5-width UNet, random weights, one process, interleaved repeats; medians are printed.
- compose: SeqLoRA merged (W += sum of 101 deltas) and bypass (install 101 stacked low-rank paths),
  against diffusers loading one exported LoRA (PEFT form) into the UNet (`load_lora_adapter`) and fusing it;
- sampling: one UNet forward (a sampler step) with nothing applied, 101 merged, 101 bypass.

    python bench/compose_speed.py            # CPU: one layer per block, 16x16 latents
    python bench/compose_speed.py --full     # full SD1.5 depth (CUDA: 64x64 latents)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import parse_args, sd15_unet, synthetic_bank, write_result

from seqlora_core import compose
from seqlora_core.interop.bank_lora import export_concept


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--concepts", type=int, default=101)
    ap.add_argument("--latent", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = parse_args(ap)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    latent = args.latent or (64 if device == "cuda" else 16)
    unet = sd15_unet(args.full, device).eval().requires_grad_(False)
    bank = synthetic_bank(unet, args.concepts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g).to(device)
    ctx = torch.randn(2, 77, 768, generator=g).to(device)
    t = torch.tensor([500, 500], device=device)

    def step() -> None:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)

    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lora = export_concept(bank, bank.names()[0], Path(tmp) / "one.safetensors", "peft", dtype="fp32")

        def diffusers_one() -> None:
            unet.load_lora_adapter(str(lora), prefix="unet", adapter_name="one")
            unet.fuse_lora(adapter_names=["one"])

        step()  # warm-up
        for _ in range(args.repeats):
            for mode in ("merged", "bypass"):
                holder = {}
                rows.setdefault(f"compose {args.concepts} {mode}", []).append(
                    timed(lambda mode=mode, holder=holder: holder.setdefault("c", compose(unet, bank, None, mode)))
                )
                rows.setdefault(f"sampling step, {args.concepts} {mode}", []).append(timed(step))
                rows.setdefault(f"undo {args.concepts} {mode}", []).append(timed(holder["c"].remove))
            rows.setdefault("compose 1 merged (SeqLoRA)", []).append(
                timed(lambda: compose(unet, bank, [bank.names()[0]], "merged").remove())
            )
            rows.setdefault("load + fuse 1 LoRA (diffusers)", []).append(timed(diffusers_one))
            unet.unfuse_lora()
            unet.unload_lora()  # back to plain Linear layers
            assert type(unet.get_submodule(bank.layers[0].name)) is torch.nn.Linear
            rows.setdefault("sampling step, nothing applied", []).append(timed(step))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"SD1.5-width UNet ({'full' if args.full else 'one layer per block'}), {device}, latent {latent}, batch 2 "
        f"(CFG), {len(bank.layers)} adapted layers, rank 4; median of {args.repeats}"
    )
    for k, v in med.items():
        print(f"  {k:45s} {v * 1000:10.1f} ms")
    one = med["load + fuse 1 LoRA (diffusers)"]
    base = med["sampling step, nothing applied"]
    ratios = {
        "compose_merged_vs_one_lora": med[f"compose {args.concepts} merged"] / one,
        "compose_bypass_vs_one_lora": med[f"compose {args.concepts} bypass"] / one,
        "step_merged_vs_base": med[f"sampling step, {args.concepts} merged"] / base,
        "step_bypass_vs_merged": med[f"sampling step, {args.concepts} bypass"]
        / med[f"sampling step, {args.concepts} merged"],
    }
    for k, v in ratios.items():
        print(f"  {k:45s} {v:10.3f}")
    path = write_result(
        f"compose_speed_{device}{'_full' if args.full else ''}",
        {
            "how": "median wall time of interleaved repeats in one process",
            "latent": latent,
            "concepts": args.concepts,
            "seconds": med,
            "ratios": ratios,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
