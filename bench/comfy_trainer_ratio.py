"""Step time of SeqLoRA's Train node against ComfyUI's own TrainLoraNode, side by side in one run.

Same model, same latents and captions, same rank, same adapted layers (the attention projections:
ComfyUI's trainer is limited to them for this comparison), batch 1, fp32, no gradient checkpointing,
AdamW for ComfyUI's. The step time is the median gap between consecutive steps (setup, statistics
passes and saving are not steps). Prints a table and the ratio ours / ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI python bench/comfy_trainer_ratio.py [--checkpoint FILE] [--steps 20]

Without --checkpoint it builds the tiny SD1.5-detected test checkpoint (random weights) in a temp folder.
Everything it writes goes to that folder, which is removed at the end, also after an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import comfy_harness as h  # noqa: E402

TARGET_SUFFIXES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)


def median_gap(stamps: list[float], skip: int = 1) -> float:
    gaps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)][skip:]
    return statistics.median(gaps) if gaps else float("nan")


class _OnlyTargets:
    """Hide every non-target layer from ComfyUI's trainer (it adapts all layers with a weight_function)."""

    def __init__(self, diffusion) -> None:
        self.diffusion = diffusion
        self.swapped: list[tuple[object, type]] = []

    def __enter__(self) -> _OnlyTargets:
        import torch

        for name, m in self.diffusion.named_modules():
            if not hasattr(m, "weight_function") or name.endswith(TARGET_SUFFIXES):
                continue
            plain = next((c for c in type(m).__mro__ if c.__module__.startswith("torch.nn.modules")), None)
            if plain is None or plain is torch.nn.Module:
                continue
            self.swapped.append((m, type(m)))
            m.__class__ = plain
        return self

    def __exit__(self, *exc: object) -> None:
        for m, cls in self.swapped:
            m.__class__ = cls


def run(checkpoint: Path | None, steps: int, rank: int, px: int, threads: int | None) -> dict:
    """Both trainers side by side; their files live in a temp folder that is always removed."""
    with tempfile.TemporaryDirectory(prefix="seqlora-bench-") as tmp:
        return _run_in(Path(tmp), checkpoint, steps, rank, px, threads)


def _run_in(tmp: Path, checkpoint: Path | None, steps: int, rank: int, px: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    h.setup_inprocess(tmp / "models")
    pack = h.load_pack()
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import comfy_extras.nodes_train as nt

    ckpt = checkpoint or h.build_tiny_checkpoint(tmp / "tiny.safetensors")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
    h.make_images(tmp / "models" / "input" / "bench", 4, size=px, seed=5, color=(200, 60, 20))
    nodes = pack.NODE_CLASS_MAPPINGS
    results: dict[str, dict] = {}
    with torch.inference_mode():
        images, captions, _ = nodes["SeqLoRAImageFolder"]().run("bench", px)

        # ---- ComfyUI's TrainLoraNode
        latents = {"samples": vae.encode(images[..., :3])}
        text = "a photo of sks thing"
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        stamps: list[float] = []
        orig_init = nt.TrainSampler.__init__

        def init(self, loss_fn, optimizer, loss_callback=None, **kw):
            def cb(loss):
                stamps.append(time.perf_counter())
                if loss_callback:
                    loss_callback(loss)

            orig_init(self, loss_fn, optimizer, loss_callback=cb, **kw)

        nt.TrainSampler.__init__ = init
        try:
            with _OnlyTargets(model.model.diffusion_model) as hidden:
                t0 = time.perf_counter()
                out = nt.TrainLoraNode().train(
                    model,
                    latents,
                    positive,
                    1,
                    steps,
                    1,
                    1e-4,
                    rank,
                    "AdamW",
                    "MSE",
                    0,
                    "fp32",
                    "fp32",
                    "LoRA",
                    False,
                    "[None]",
                )
                total = time.perf_counter() - t0
            lora = sorted({k.split(".lora")[0] for k in out[1] if ".lora" in k})
            bias = sorted(k for k in out[1] if k.endswith(".diff_b"))
            results["comfyui_TrainLoraNode"] = {
                "step_s": median_gap(stamps),
                "total_s": total,
                "hidden_layers": len(hidden.swapped),
                "layers": len(lora),
                "bias_diffs": len(bias),
                "keys": sorted(out[1])[:4],
            }
        finally:
            nt.TrainSampler.__init__ = orig_init
        mm.unload_all_models()

        # ---- ours: seqlora (bilevel, constrained) and a plain lora in the same engine
        for method, concept in (("lora", "plain"), ("seqlora", "first"), ("seqlora", "second")):
            step_stamps: list[float] = []

            def hook(value, total, preview, node_id=None, stamps=step_stamps):
                stamps.append(time.perf_counter())

            comfy.utils.set_progress_bar_global_hook(hook)
            bank = results.get("_bank")
            t0 = time.perf_counter()
            new_bank, _, _ = nodes["SeqLoRATrainConcept"]().run(
                model,
                clip,
                vae,
                images,
                concept,
                f"sks {concept}",
                method,
                rank,
                steps,
                1e-4,
                0.05,
                "attn",
                0,
                1,
                "a photo of {trigger}",
                bank if concept == "second" else None,
                captions,
                f"bench-{concept}",
            )
            total = time.perf_counter() - t0
            comfy.utils.set_progress_bar_global_hook(None)
            c = new_bank.concept(concept)
            results[f"seqlora_node[{method}, {concept}]"] = {
                "step_s": median_gap(step_stamps),
                "total_s": total,
                "layers": len(new_bank.layers),
                "timings": {k: round(v, 3) for k, v in c.timings.items()},
            }
            if concept == "first":
                results["_bank"] = new_bank
        results.pop("_bank")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="an SD1.5 .safetensors (default: tiny random)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--px", type=int, default=64, help="training image side in pixels")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the temp folder is removed then too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if h.missing_requirements():
        print(h.missing_requirements())
        return 2
    res = run(args.checkpoint, args.steps, args.rank, args.px, args.threads)
    theirs = res["comfyui_TrainLoraNode"]["step_s"]
    print(f"{'trainer':<36} {'step (s)':>10} {'total (s)':>10}  ratio to ComfyUI")
    for name, r in res.items():
        print(f"{name:<36} {r['step_s']:>10.4f} {r['total_s']:>10.2f}  {r['step_s'] / theirs:>6.3f}")
    ours = res["seqlora_node[seqlora, second]"]["step_s"]
    print(f"\nratio (SeqLoRA Train node, 2nd concept) / ComfyUI TrainLoraNode per step: {ours / theirs:.3f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
