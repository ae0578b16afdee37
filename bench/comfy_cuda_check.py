"""One prepared check of the Train node on a CUDA GPU (bf16 autocast), side by side with ComfyUI's TrainLoraNode.

Builds a random checkpoint with the real SD1.5 UNet shape (859 M parameters, TAESD, CLIP-L) at run time,
so it needs no model files and no network; trains with ComfyUI's TrainLoraNode and with SeqLoRA's Train
node (a first concept of a new bank, then a second one) in ComfyUI on the GPU; prints step times and
totals of both (``bench/comfy_trainer_ratio.py`` does the timing); then checks what was trained:

- every loss is finite;
- the bank written by the Save Bank node reads back with both concepts;
- composition through ComfyUI's own patcher (the loader node, merged) equals W0 + sum_t s_t B_t A_t on
  every adapted layer;
- the exported concept loads in the stock LoraLoader with every key.

    COMFYUI_PATH=/path/to/ComfyUI python3 bench/comfy_cuda_check.py [--px 512] [--steps 60] [--json out.json]

A smoke run of the script itself on a CPU: ``--device cpu --family sd15 --px 64 --steps 4``.

Exit status: 0 all checks passed, 1 a check failed, 3 something it needs is missing (named, with the fix).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

# import name -> pip name: what ComfyUI 0.3.64's in-process import (comfy.sd, comfy.sample, comfy.lora, nodes,
# comfy_extras.nodes_train) and this pack need. Checked in a fresh venv: with only torch, transformers,
# safetensors, numpy, pillow, tqdm, psutil, pyyaml, einops, scipy and aiohttp, the import still lacks
# torchvision, torchsde (which brings trampoline) and av.
NEEDED = {
    "torch": "torch",
    "torchvision": "torchvision (the build matching torch)",
    "torchsde": "torchsde",
    "trampoline": "trampoline",
    "av": "av",
    "safetensors": "safetensors",
    "numpy": "numpy",
    "PIL": "pillow",
    "transformers": "transformers",
    "einops": "einops",
    "scipy": "scipy",
    "tqdm": "tqdm",
    "psutil": "psutil",
    "yaml": "pyyaml",
    "aiohttp": "aiohttp",
}


def missing_packages() -> list[str]:
    return [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]


def preflight(comfy_path: str | None, device: str = "cuda") -> str | None:
    """Why this machine cannot run the check, or None."""
    gone = missing_packages()
    if gone:
        return (
            "missing Python packages: " + ", ".join(gone) + ". Install them (offline: pip install --no-index "
            "--find-links WHEELS_DIR " + " ".join(g.split(" ")[0] for g in gone) + ")"
        )
    if not comfy_path or not (Path(comfy_path) / "main.py").is_file():
        return "set COMFYUI_PATH to a ComfyUI 0.3.64 source folder (a copy of the snapshot, with custom_nodes/)"
    if not (Path(comfy_path) / "custom_nodes").is_dir():
        return f"{comfy_path}/custom_nodes is missing: create it (ComfyUI 0.3.64 needs it)"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def check_trained(ctx: dict, report: dict) -> None:
    """The checks of the module docstring on what `comfy_trainer_ratio` trained (runs inside its temp folder)."""
    import comfy.model_management as mm
    import torch

    import nodes as comfy_nodes

    pack, bank, model, clip = ctx["pack"], ctx["bank"], ctx["model"], ctx["clip"]
    found: dict[str, object] = {}
    losses = [v for c in bank.concepts for v in c.loss_curve]
    found["losses_finite"] = bool(losses) and all(math.isfinite(v) for v in losses)

    saved = pack.NODE_CLASS_MAPPINGS["SeqLoRASaveBank"]().run(bank, "cuda_check", True)["result"][0]
    found["bank_reads_back"] = type(bank).load(saved).names() == bank.names() == ["first", "second"]

    strengths = {"first": 0.7, "second": 1.3}
    diffusion = model.model.diffusion_model
    with torch.inference_mode():
        mm.load_models_gpu([model], force_full_load=True)
        w0 = {s.name: diffusion.get_submodule(s.name).weight.detach().float().cpu().clone() for s in bank.layers}
        text = ", ".join(f"{k}:{v}" for k, v in strengths.items())
        merged = pack.NODE_CLASS_MAPPINGS["SeqLoRAMultiConceptLoader"]().run(
            model, "(linked bank)", text, "merged", bank
        )["result"][0]
        mm.load_models_gpu([merged], force_full_load=True)
        worst = 0.0
        for s in bank.layers:
            w = diffusion.get_submodule(s.name).weight.detach().float().cpu()
            delta = sum(v * bank.concept(k).delta(s.name).reshape(w.shape) for k, v in strengths.items())
            # ComfyUI sums the patches in fp32 and rounds to the weights' storage dtype
            ulp = float(w0[s.name].abs().max()) * 2.0 ** -(8 if w.dtype == torch.bfloat16 else 10)
            err = float((w - w0[s.name] - delta).abs().max())
            worst = max(worst, err / (float(delta.abs().max()) + 2 * ulp))
        found["merged_equals_w0_plus_sum_of_deltas"] = worst <= 1.0
        report["merged_error_relative"] = worst
        mm.load_models_gpu([model], force_full_load=True)

        path = Path(
            pack.NODE_CLASS_MAPPINGS["SeqLoRAExportLoRA"]().run(bank, "second", "cuda_check", "fp16", True)["result"][0]
        )
        stock, _ = comfy_nodes.LoraLoader().load_lora(model, clip, path.name, 1.0, 0.0)
        found["stock_loader_takes_every_key"] = len(stock.patches) == len(bank.layers)
    report["checks"] = found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of this script")
    ap.add_argument("--family", default="sd15_full", choices=["sd15_full", "sd15"], help="sd15: the tiny UNet")
    args = ap.parse_args()
    why = preflight(os.environ.get("COMFYUI_PATH"), args.device)
    if why:
        print(f"comfy_cuda_check: cannot run: {why}", file=sys.stderr)
        return 3
    import comfy_trainer_ratio as bench

    started = time.time()
    report: dict = {}
    res = bench.run(
        None, args.steps, args.rank, args.px, None, args.family, args.device, lambda ctx: check_trained(ctx, report)
    )
    rat = bench.ratios(res)
    print(f"{'trainer':<40} {'step (s)':>10} {'total (s)':>10}  ratio per step / total")
    for name, r in res.items():
        line = f"{name:<40} {r['step_s']:>10.4f} {r['total_s']:>10.2f}"
        if name in rat:
            line += f"  {rat[name]['per_step']:>6.3f} / {rat[name]['total']:.3f}"
        print(line)
    for name, ok in report["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(
        f"merged weights vs W0 + sum s B A: worst error / (max |delta| + 2 ulp) = {report['merged_error_relative']:.3g}"
    )
    if args.json:
        record = {
            "command": "python3 bench/comfy_cuda_check.py " + " ".join(sys.argv[1:]),
            "machine": bench.machine(),
            "wall_s": time.time() - started,
            "results": res,
            "ratios": rat,
            **report,
        }
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
