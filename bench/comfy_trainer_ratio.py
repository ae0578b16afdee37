"""SeqLoRA's Train node against ComfyUI's own TrainLoraNode, side by side in one run: per step and in total.

Same model, same images (encoded by each trainer as it does), same rank, same adapted layers (the
attention projections: every other layer is hidden from ComfyUI's trainer, which adapts all of them),
batch 1, AdamW for ComfyUI's. "step" is the median gap between consecutive training steps; "total" is the
node's whole run, everything it does before and after its steps included (encoding, statistics, the
basis, saving). SeqLoRA trains two concepts: the first of a new bank (which also measures the base model's
own generations, once per bank) and a second one on top of it (what every later concept costs).
``--rounds N`` runs all three N times in one process, alternating whether ComfyUI's trainer or SeqLoRA's
goes first, and reports the medians (per trainer, and of each round's ratios): on a noisy machine one
round can land in a slow spell.

    COMFYUI_PATH=/path/to/ComfyUI python bench/comfy_trainer_ratio.py --px 64 --steps 100 --rounds 5 \\
        --json bench/results/comfy_trainer_ratio_64px_rounds.json

Without --checkpoint it builds the tiny SD1.5-detected test checkpoint (random weights; ``--family
sd15_full`` builds the real SD1.5 UNet shape). Everything it writes goes to a temp folder, removed at the
end, also after an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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
THEIRS = "comfyui_TrainLoraNode"
OURS = ("seqlora_node[first concept, new bank]", "seqlora_node[second concept]")


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


def run(
    checkpoint: Path | None,
    steps: int,
    rank: int,
    px: int,
    threads: int | None,
    family: str = "sd15",
    device: str = "cpu",
    after: Callable[[dict], None] | None = None,
    rounds: int = 1,
) -> dict:
    """Both trainers side by side, ``rounds`` times (see ``_run_in``); their files live in a temp folder that
    is always removed. ``after(context)`` (model, clip, vae, images, bank, pack, tmp) runs before that, for
    checks of what was trained."""
    with tempfile.TemporaryDirectory(prefix="seqlora-bench-") as tmp:
        _TEMP_DIRS.append(Path(tmp))
        try:
            return _run_in(Path(tmp), checkpoint, steps, rank, px, threads, family, device, after, rounds)
        finally:
            _TEMP_DIRS.remove(Path(tmp))


_TEMP_DIRS: list[Path] = []  # the run's temp folders, for the signal handler


def _remove_temp_and_exit(signum: int, frame) -> None:
    """Ctrl-C or SIGTERM: remove the temp folders and exit at once. An exception would not do: code
    between here and the trainers (ComfyUI's, a checkpoint being written) may swallow it, and the run
    then went on training."""
    for tmp in list(_TEMP_DIRS):
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"interrupted (signal {signum}); removed the temp folder", flush=True)
    os._exit(128 + signum)


def _comfy_trainer(nt, model, vae, clip, images, steps: int, rank: int, dtype: str, seed: int = 0) -> dict:
    """ComfyUI's TrainLoraNode on the target layers: its step times and total."""
    import time as _time

    stamps: list[float] = []
    orig_init = nt.TrainSampler.__init__

    def init(self, loss_fn, optimizer, loss_callback=None, **kw):
        def cb(loss):
            stamps.append(_time.perf_counter())
            if loss_callback:
                loss_callback(loss)

        orig_init(self, loss_fn, optimizer, loss_callback=cb, **kw)

    nt.TrainSampler.__init__ = init
    try:
        with _OnlyTargets(model.model.diffusion_model) as hidden:
            t0 = _time.perf_counter()
            latents = {"samples": vae.encode(images[..., :3])}
            positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks thing"))
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
                seed,
                dtype,
                "fp32",
                "LoRA",
                False,
                "[None]",
            )
            total = _time.perf_counter() - t0
    finally:
        nt.TrainSampler.__init__ = orig_init
    lora = sorted({k.split(".lora")[0] for k in out[1] if ".lora" in k})
    return {
        "step_s": median_gap(stamps),
        "total_s": total,
        "steps": len(stamps),
        "hidden_layers": len(hidden.swapped),
        "layers": len(lora),
        "loss_last": float(out[2]["loss"][-1]) if out[2]["loss"] else None,
    }


def _run_in(
    tmp: Path,
    checkpoint: Path | None,
    steps: int,
    rank: int,
    px: int,
    threads: int | None,
    family: str,
    device: str,
    after: Callable[[dict], None] | None = None,
    rounds: int = 1,
) -> dict:
    """Build the checkpoint and images, then ``rounds`` rounds of: ComfyUI's trainer, and SeqLoRA's first
    concept of a new bank and a second one on it (in alternating order, each round with its own seed and
    with the text cache emptied). Each trainer's medians over the rounds (``combine_rounds``)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    h.setup_inprocess(tmp / "models", cpu=device == "cpu")
    pack = h.load_pack()
    import comfy.model_management as mm
    import comfy.sd
    import comfy_extras.nodes_train as nt

    ckpt = checkpoint or h.build_tiny_checkpoint(tmp / f"{family}.safetensors", family=family)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
    h.make_images(tmp / "models" / "input" / "seqlora" / "bench", 4, size=px, seed=5, color=(200, 60, 20))
    nodes = pack.NODE_CLASS_MAPPINGS
    dtype = "fp32" if device == "cpu" else "bf16"
    per_round: list[dict[str, dict]] = []
    banks: list = []  # each round's bank after its second concept
    with torch.inference_mode():
        images, captions, _ = nodes["SeqLoRAImageFolder"]().run("seqlora/bench", px)["result"]
        for rnd in range(rounds):
            results: dict[str, dict] = {}

            def theirs(rnd: int = rnd, results: dict = results) -> None:
                results[THEIRS] = _comfy_trainer(nt, model, vae, clip, images, steps, rank, dtype, seed=rnd)
                mm.unload_all_models()

            def ours(rnd: int = rnd, results: dict = results) -> None:
                pack.nodes.training.TEXTS.items.clear()  # every round encodes its texts, as ComfyUI's does
                bank = None
                for label, concept in zip(OURS, ("first", "second"), strict=True):
                    results[label], bank = _our_concept(
                        nodes, model, clip, vae, images, captions, concept, bank, steps, rank, rnd
                    )
                banks.append(bank)
                mm.unload_all_models()

            for part in (theirs, ours) if rnd % 2 == 0 else (ours, theirs):  # alternate who goes first
                part()
            per_round.append(results)
        bank = banks[-1]
        if after is not None:
            after({"model": model, "clip": clip, "vae": vae, "images": images, "bank": bank, "pack": pack, "tmp": tmp})
    return combine_rounds(per_round)


def _our_concept(nodes, model, clip, vae, images, captions, concept: str, bank, steps: int, rank: int, seed: int):
    """One run of SeqLoRA's Train node (a new bank when ``bank`` is None): (its timings, the new bank)."""
    import comfy.utils

    node_id = f"bench-{concept}"
    step_stamps: list[float] = []

    def hook(value, total, preview, node_id=None, stamps=step_stamps, mine=node_id):
        if node_id == mine:  # training steps; the base model's generations have a bar of their own
            stamps.append(time.perf_counter())

    comfy.utils.set_progress_bar_global_hook(hook)
    t0 = time.perf_counter()
    try:
        out = nodes["SeqLoRATrainConcept"]().run(
            model,
            clip,
            vae,
            images,
            concept,
            f"sks {concept}",
            "seqlora",
            rank,
            steps,
            1e-4,
            0.05,
            "attn",
            seed,
            1,
            "a photo of {trigger}",
            bank,
            captions,
            unique_id=node_id,
        )
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    total = time.perf_counter() - t0
    bank = out["result"][0]
    c = bank.concept(concept)
    trainer_total = c.timings.get("total_s", float("nan"))
    result = {
        "step_s": median_gap(step_stamps),
        "total_s": total,
        "steps": len(step_stamps),
        "layers": len(bank.layers),
        "outside_trainer_s": total - trainer_total,
        "timings": {k: round(v, 3) for k, v in c.timings.items()},
        "loss_last": c.loss_curve[-1],
    }
    return result, bank


def combine_rounds(per_round: list[dict[str, dict]]) -> dict[str, dict]:
    """Each trainer's first round, with step_s and total_s the medians over the rounds and every round's
    step_s and total_s listed under "rounds"."""
    out = {}
    for name in per_round[0]:
        rows = [r[name] for r in per_round]
        out[name] = rows[0] | {
            "step_s": statistics.median(r["step_s"] for r in rows),
            "total_s": statistics.median(r["total_s"] for r in rows),
            "rounds": [{"step_s": r["step_s"], "total_s": r["total_s"]} for r in rows],
        }
    return out


def ratios(res: dict) -> dict:
    """Ours / ComfyUI's, per step and in total, for both of our concepts: the median over the rounds of each
    round's ratio (each round's trainers ran next to each other), and every round's ratio."""
    theirs = res[THEIRS]["rounds"]
    out = {}
    for label in OURS:
        mine = res[label]["rounds"]
        step = [m["step_s"] / t["step_s"] for m, t in zip(mine, theirs, strict=True)]
        total = [m["total_s"] / t["total_s"] for m, t in zip(mine, theirs, strict=True)]
        out[label] = {
            "per_step": statistics.median(step),
            "total": statistics.median(total),
            "per_step_rounds": step,
            "total_rounds": total,
        }
    return out


def table(files: list[Path]) -> str:
    """The docs table of result files (one row per trainer and resolution)."""
    rows = [
        "| px | steps | trainer | step s | total s | ratio per step | ratio total | basis init s | stats s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in files:
        rec = json.loads(Path(f).read_text())
        px, steps = rec["settings"]["px"], rec["settings"]["steps"]
        for name, r in rec["results"].items():
            rat = rec["ratios"].get(name, {})
            t = r.get("timings") or {}
            stats = t.get("concept_stats_s", 0) + t.get("final_stats_s", 0) if t else None
            rows.append(
                f"| {px} | {steps} | {name} | {r['step_s']:.3f} | {r['total_s']:.1f} | "
                + (f"{rat['per_step']:.2f} | {rat['total']:.2f} | " if rat else "1 | 1 | ")
                + (f"{t.get('basis_init_s', 0):.1f} | {stats:.1f} |" if t else "- | - |")
            )
    return "\n".join(rows)


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="an SD1.x .safetensors (default: built at run time)")
    ap.add_argument("--family", default="sd15", choices=["sd15", "sd15_full"], help="the random checkpoint to build")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--px", type=int, default=64, help="training image side in pixels")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run both trainers this many times, alternating which goes first; report medians",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--table", type=Path, nargs="+", default=None, help="only write docs/benchmarks.md's table of these"
    )
    args = ap.parse_args()
    if args.table:
        sys.path.insert(0, str(ROOT))
        from _common import update_tables

        update_tables("comfy_trainer_ratio", table(args.table))
        return 0
    for sig in (signal.SIGINT, signal.SIGTERM):  # the temp folder goes on an interrupt too
        signal.signal(sig, _remove_temp_and_exit)
    if h.missing_requirements():
        print(h.missing_requirements())
        return 2
    started = time.time()
    if args.rounds < 1:
        ap.error("--rounds: use 1 or more")
    res = run(
        args.checkpoint, args.steps, args.rank, args.px, args.threads, args.family, args.device, None, args.rounds
    )
    rat = ratios(res)
    print(f"{'trainer':<40} {'step (s)':>10} {'total (s)':>10}  ratio per step / total")
    for name, r in res.items():
        line = f"{name:<40} {r['step_s']:>10.4f} {r['total_s']:>10.2f}"
        if name in rat:
            line += f"  {rat[name]['per_step']:>6.3f} / {rat[name]['total']:.3f}"
        print(line)
    if args.json:
        record = {
            "command": "python bench/comfy_trainer_ratio.py " + " ".join(sys.argv[1:]),
            "settings": vars(args) | {"json": str(args.json), "checkpoint": str(args.checkpoint)},
            "machine": machine(),
            "wall_s": time.time() - started,
            "results": res,
            "ratios": rat,
        }
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
