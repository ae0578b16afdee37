"""``python -m seqlora_core``: train concepts one after another, report, export, import, generate, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

BASES_HELP = "'toy' (the embedded toy world), 'tiny' (random, for tests), a diffusers folder or a .safetensors file"


def _load_base(base: str, device: str | None = None) -> Any:
    if base == "toy":
        from .toy.model import load_toy_pipeline

        pipe = load_toy_pipeline()
    else:
        from .diffusers_backend import load_pipeline

        pipe = load_pipeline(base)
    if device:
        pipe.to(device)
    return pipe


def _architecture(base: str, pipe: Any) -> str:
    if base in ("toy", "tiny"):
        return base
    from .diffusers_backend import is_sdxl

    return "sdxl" if is_sdxl(pipe) else "sd15"


def _device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_bank(path: Path):
    from .bank import ConceptBank

    return ConceptBank.load(path) if path.exists() else None


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .dataset import ConceptDataset
    from .diffusers_backend import DiffusersConceptData, diffusion_loss, native_resolution
    from .trainer import TrainCallbacks, TrainConfig, TrainingCancelled, train_concept

    bank_path = Path(args.bank)
    bank = _load_bank(bank_path)
    name = args.name or args.trigger.split()[0]
    device = _device(args.device)
    pipe = _load_base(args.base, device)
    resolution = args.resolution or native_resolution(pipe)
    dataset = ConceptDataset.from_folder(args.images, args.trigger, args.caption_template, resolution)
    data = DiffusersConceptData(pipe, dataset, batch_size=args.batch_size, seed=args.seed)
    cfg = TrainConfig(
        name=name, triggers=[args.trigger], method=args.method, rank=args.rank, steps=args.steps, lr=args.lr,
        budget=args.budget, targets=args.targets, context=args.context, seed=args.seed, protect=args.protect,
        stats_batches=args.stats_batches or max(4, -(-16 // args.batch_size)),
        checkpoint_path=str(bank_path.with_name(f"{bank_path.stem}.{name}.partial.safetensors")),
        checkpoint_every=args.checkpoint_every, layer_naming="diffusers", architecture=_architecture(args.base, pipe),
    )
    bar = tqdm(total=args.steps, desc=f"training {name!r} ({args.method})", unit="step", disable=args.quiet)

    def on_step(info) -> None:
        bar.n = info.step
        bar.set_postfix(loss=f"{info.loss:.4f}", interference=f"{info.interference:.3f}", refresh=False)
        bar.refresh()

    prior = data.prior_batches
    if args.base == "toy":  # the toy world's own scenes are its trigger-free prior
        from .evaluate import toy_prior_data

        prior = toy_prior_data(pipe, seed=args.seed).batches
    try:
        new_bank = train_concept(pipe.unet, diffusion_loss, data.batches, cfg, bank, prior,
                                 TrainCallbacks(on_step=on_step, on_phase=lambda p: bar.set_description(p)))
    except (KeyboardInterrupt, TrainingCancelled):
        bar.close()
        print(f"interrupted; progress is in {cfg.checkpoint_path}: run the same command to resume", file=sys.stderr)
        return 130
    bar.close()
    new_bank.save(bank_path)
    c = new_bank.concepts[-1]
    print(f"learned {c.name!r} ({c.method}, rank {c.rank}) in {c.timings['total_s']:.1f} s; "
          f"bank {bank_path} now holds {len(new_bank.concepts)} concepts: {', '.join(new_bank.names())}")
    if c.info.get("soft_layers"):
        print(f"note: {len(c.info['soft_layers'])} layers were full; orthogonality there is a penalty only")
    if c.info.get("budget") and not c.info["budget"]["met"]:
        from .trainer import budget_message

        print(f"warning: {budget_message(c.info['budget'])}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .bank import ConceptBank
    from .report import build_report, write_heatmap_png

    bank = ConceptBank.load(args.bank)
    rep = build_report(bank)
    if args.base == "toy" and args.identity:
        from .toy.identity import identity_report

        rep["identity"] = identity_report(_load_base("toy"), bank)
    if args.png:
        write_heatmap_png(rep, args.png)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(f"{len(rep['concepts'])} concepts; mean relative interference {rep['mean_relative_interference']:.4f}")
        for t, name in enumerate(rep["concepts"]):
            row = " ".join(f"{v:7.4f}" for v in rep["interference"][t])
            print(f"  {t:2d} {name:20s} {row}   base drift {rep['base_drift'][t]:.4f}")
        full = [k for k, v in rep["capacity"].items() if v["soft"]]
        print(f"capacity: {len(full)} of {len(rep['capacity'])} layers full" + (f" (e.g. {full[0]})" if full else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .bank import ConceptBank
    from .lora_io import export_concept

    bank = ConceptBank.load(args.bank)
    path = export_concept(bank, args.concept, args.out, args.format, args.dtype)
    print(f"wrote {path} ({args.format}); triggers: {', '.join(bank.concept(args.concept).triggers) or 'none'}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .lora_io import import_lora

    bank_path = Path(args.bank)
    bank = _load_bank(bank_path)
    if bank is None:
        raise SystemExit(f"bank {bank_path} does not exist: train a concept first, so the bank knows its layers")
    new = import_lora(bank, args.lora, args.name, [args.trigger] if args.trigger else None)
    new.save(bank_path)
    print(f"imported {args.lora} as frozen concept {args.name!r}; later concepts are trained orthogonal to it")
    return 0


def parse_selection(text: str) -> dict[str, float]:
    """'a:1.0,b:0.7,c' -> {'a': 1.0, 'b': 0.7, 'c': 1.0}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, strength = part.partition(":")
        try:
            out[name.strip()] = float(strength) if strength else 1.0
        except ValueError:
            raise SystemExit(f"--concepts: strength {strength!r} of {name!r} is not a number") from None
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    from .bank import ConceptBank
    from .compose import compose
    from .diffusers_backend import generate

    pipe = _load_base(args.base, _device(args.device))
    bank = ConceptBank.load(args.bank)
    selection = parse_selection(args.concepts) if args.concepts else {}
    with compose(pipe.unet, bank, selection, mode=args.mode):
        image = generate(pipe, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance)[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), concepts=args.concepts, steps=args.steps, seed=args.seed, quiet=args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seqlora_core", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="learn concepts one after another on the toy world and compose them")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument("--concepts", type=int, default=4, help="how many concepts to learn (default 4)")
    d.add_argument("--steps", type=int, default=None, help="training steps per concept (default: the demo's)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="learn one concept and append it to a bank (created when absent)")
    t.add_argument("--base", required=True, help=BASES_HELP)
    t.add_argument("--images", required=True, help="folder of images with optional same-name .txt captions")
    t.add_argument("--trigger", required=True, help="trigger words of the concept, e.g. 'sks dog'")
    t.add_argument("--bank", required=True, help="bank file (.safetensors)")
    t.add_argument("--name", help="concept name (default: the first trigger word)")
    t.add_argument("--method", default="seqlora",
                   help="seqlora (default), lora, sequential, ortho_frozen, joint, fusion")
    t.add_argument("--rank", type=int, default=4)
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--lr", type=float, default=1e-4, help="learning rate of the up factor (basis: 0.1x)")
    t.add_argument("--budget", type=float, default=0.05, help="interference budget eps (relative)")
    t.add_argument("--protect", choices=["adaptive", "off"], default="adaptive",
                   help="keep the new basis out of the earlier concepts' and the base's top-energy input directions "
                        "(adaptive, default) or only orthogonal to earlier bases (off)")
    t.add_argument("--stats-batches", type=int, default=None,
                   help="batches per activation-statistics pass (default: at least 16 images, at least 4 batches)")
    t.add_argument("--targets", default="attn", help="attn (default), cross_kv, attn_ff, all_linear, or name patterns")
    t.add_argument("--context", choices=["stacked", "base"], default=None, help="train on top of earlier concepts "
                   "(stacked, SeqLoRA's default) or on the base model")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--resolution", type=int, default=None, help="training resolution (default: the model's)")
    t.add_argument("--caption-template", default="a photo of {trigger}", help="caption for images without .txt")
    t.add_argument("--checkpoint-every", type=int, default=50, help="save resumable progress every N steps")
    t.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("report", help="interference matrix, forgetting bound, capacity")
    r.add_argument("--bank", required=True)
    r.add_argument("--base", default=None, help=BASES_HELP + " (needed only for --identity)")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.add_argument("--png", default=None, help="write the interference heatmap here")
    r.add_argument("--identity", action="store_true", help="with --base toy: identity score of every concept")
    r.set_defaults(fn=cmd_report)

    e = sub.add_parser("export", help="one concept as an ordinary LoRA file")
    e.add_argument("--bank", required=True)
    e.add_argument("--base", default=None, help="unused; accepted for symmetry with the other commands")
    e.add_argument("--concept", required=True)
    e.add_argument("--format", choices=["kohya", "peft"], default="kohya")
    e.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    e.add_argument("--out", required=True, help="output .safetensors")
    e.set_defaults(fn=cmd_export)

    i = sub.add_parser("import", help="add a foreign LoRA file to a bank as a frozen concept")
    i.add_argument("--bank", required=True)
    i.add_argument("--lora", required=True, help="a kohya, PEFT or ComfyUI-trainer .safetensors LoRA")
    i.add_argument("--name", required=True)
    i.add_argument("--trigger", default=None, help="trigger words (default: the file's metadata)")
    i.set_defaults(fn=cmd_import)

    g = sub.add_parser("generate", help="an image with any concepts composed (no fusion)")
    g.add_argument("--base", required=True, help=BASES_HELP)
    g.add_argument("--bank", required=True)
    g.add_argument("--concepts", default="", help="NAME[:STRENGTH],... (default: none)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True, help="output PNG")
    g.add_argument("--mode", choices=["merged", "bypass"], default="merged")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--device", default=None)
    g.set_defaults(fn=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from .bank import BankError

    try:
        return args.fn(args)
    except (BankError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
