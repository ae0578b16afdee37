"""``python -m seqlora_core``: train concepts one after another, report, export, import, generate, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..data.captions import DEFAULT_TEMPLATE
from ..method import selection
from ..method.methods import METHODS
from ..method.targets import PRESETS
from .bases import BASES_HELP, TOY


def _device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_bank(path: Path):
    from ..method.bank import ConceptBank

    return ConceptBank.load(path) if path.exists() else None


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..method.trainer import TrainCallbacks, TrainConfig, TrainingCancelled
    from .bases import architecture_of, load_base
    from .recipes import train_from_folder

    bank_path = Path(args.bank)
    bank = _load_bank(bank_path)
    name = args.name or args.trigger.split()[0]
    pipe = load_base(args.base, _device(args.device))
    cfg = TrainConfig(
        name=name,
        triggers=[args.trigger],
        method=args.method,
        rank=args.rank,
        steps=args.steps,
        lr=args.lr,
        budget=args.budget,
        targets=args.targets,
        context=args.context,
        seed=args.seed,
        protect=args.protect,
        stats_batches=args.stats_batches or max(4, -(-16 // args.batch_size)),
        checkpoint_path=str(bank_path.with_name(f"{bank_path.stem}.{name}.partial.safetensors")),
        checkpoint_every=args.checkpoint_every,
        layer_naming="diffusers",
        architecture=architecture_of(args.base, pipe),
    )
    bar = tqdm(total=args.steps, desc=f"training {name!r} ({args.method})", unit="step", disable=args.quiet)

    def on_step(info) -> None:
        bar.n = info.step
        bar.set_postfix(loss=f"{info.loss:.4f}", interference=f"{info.interference:.3f}", refresh=False)
        bar.refresh()

    callbacks = TrainCallbacks(on_step=on_step, on_phase=lambda p: bar.set_description(p))
    try:
        new_bank = train_from_folder(
            pipe,
            args.images,
            args.trigger,
            cfg,
            bank,
            resolution=args.resolution,
            caption_template=args.caption_template,
            batch_size=args.batch_size,
            callbacks=callbacks,
            class_prompt=args.class_prompt,
            prior_images=args.prior_images,
            min_snr_gamma=args.min_snr_gamma,
        )
    except (KeyboardInterrupt, TrainingCancelled):
        bar.close()
        print(f"interrupted; progress is in {cfg.checkpoint_path}: run the same command to resume", file=sys.stderr)
        return 130
    bar.close()
    new_bank.save(bank_path)
    c = new_bank.concepts[-1]
    print(
        f"learned {c.name!r} ({c.method}, rank {c.rank}) in {c.timings['total_s']:.1f} s; "
        f"bank {bank_path} now holds {len(new_bank.concepts)} concepts: {', '.join(new_bank.names())}"
    )
    if c.info.get("soft_layers"):
        print(f"note: {len(c.info['soft_layers'])} layers were full; orthogonality there is a penalty only")
    if c.info.get("budget") and not c.info["budget"]["met"]:
        from ..method.trainer import budget_message

        print(f"warning: {budget_message(c.info['budget'])}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..method.bank import ConceptBank
    from ..method.report import build_report, report_text
    from .heatmap import write_heatmap_png

    bank = ConceptBank.load(args.bank)
    rep = build_report(bank)
    if args.base == TOY and args.identity:
        from ..toy.evaluation import identity_report
        from .bases import load_base

        rep["identity"] = identity_report(load_base(TOY), bank)
    if args.png:
        write_heatmap_png(rep, args.png)
    print(json.dumps(rep, indent=1) if args.json else report_text(rep))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..interop.bank_lora import export_concept
    from ..method.bank import ConceptBank

    bank = ConceptBank.load(args.bank)
    path = export_concept(bank, args.concept, args.out, args.format, args.dtype)
    print(f"wrote {path} ({args.format}); triggers: {', '.join(bank.concept(args.concept).triggers) or 'none'}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from ..interop.bank_lora import import_lora

    bank_path = Path(args.bank)
    bank = _load_bank(bank_path)
    if bank is None:
        raise SystemExit(f"bank {bank_path} does not exist: train a concept first, so the bank knows its layers")
    new = import_lora(bank, args.lora, args.name, [args.trigger] if args.trigger else None)
    new.save(bank_path)
    print(f"imported {args.lora} as frozen concept {args.name!r}; later concepts are trained orthogonal to it")
    return 0


def parse_selection(text: str) -> dict[str, float]:
    """``--concepts`` -> {name: strength} of the concepts switched on: 'a:1.0, b:0.7, c, !d:0.5' ->
    {'a': 1.0, 'b': 0.7, 'c': 1.0} (the selection grammar of ``seqlora_core.method.selection``)."""
    try:
        return selection.enabled_strengths(selection.parse_selection(text, "--concepts"))
    except ValueError as e:
        raise SystemExit(str(e)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from ..backends.diffusers_backend import generate
    from ..method.bank import ConceptBank
    from ..method.compose import compose
    from .bases import load_base

    pipe = load_base(args.base, _device(args.device))
    bank = ConceptBank.load(args.bank)
    chosen = parse_selection(args.concepts)
    with compose(pipe.unet, bank, chosen, mode=args.mode):
        image = generate(pipe, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance)[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        Path(args.out),
        concepts=args.concepts,
        steps=args.steps,
        seed=args.seed,
        quiet=args.quiet,
        compare_lora=args.compare_lora,
    )
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
    d.add_argument(
        "--compare-lora",
        action="store_true",
        help="also learn the same concepts as plain LoRAs and measure their effect on trigger-free prompts",
    )
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="learn one concept and append it to a bank (created when absent)")
    t.add_argument("--base", required=True, help=BASES_HELP)
    t.add_argument("--images", required=True, help="folder of images with optional same-name .txt captions")
    t.add_argument("--trigger", required=True, help="trigger words of the concept, e.g. 'sks dog'")
    t.add_argument("--bank", required=True, help="bank file (.safetensors)")
    t.add_argument("--name", help="concept name (default: the first trigger word)")
    t.add_argument(
        "--method", default="seqlora", help=f"{', '.join(METHODS)} (default seqlora; the others are baselines)"
    )
    t.add_argument("--rank", type=int, default=4)
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--lr", type=float, default=1e-4, help="learning rate of the up factor (basis: 0.1x)")
    t.add_argument("--budget", type=float, default=0.05, help="interference budget eps (relative)")
    t.add_argument("--targets", default="attn", help=f"{', '.join(PRESETS)} (default attn), or name patterns")
    t.add_argument(
        "--context",
        choices=["stacked", "base", "mixed"],
        default=None,
        help="train on top of earlier concepts (stacked), on the base model (base), or each step either, "
        "by a seeded coin (mixed: SeqLoRA's default, so a concept works alone and with the earlier ones)",
    )
    t.add_argument(
        "--protect",
        choices=["adaptive", "off"],
        default="adaptive",
        help="keep the new basis out of the earlier concepts' and the base's top-energy input directions "
        "(adaptive, default) or only orthogonal to earlier bases (off)",
    )
    t.add_argument(
        "--min-snr-gamma",
        type=float,
        default=None,
        help="weight the loss by min(SNR, gamma) / SNR (min-SNR training; 5 is typical; default off, "
        "the toy base uses its pretraining's 5)",
    )
    t.add_argument(
        "--class-prompt",
        default=None,
        help="a trigger-free prompt for what the concept is (e.g. 'a photo of a dog'); with the captions "
        "without their trigger and the empty prompt, the base model's images for it are what a new bank protects",
    )
    t.add_argument(
        "--prior-images",
        type=int,
        default=8,
        help="images the base model generates for those prompts when a bank is created (default 8)",
    )
    t.add_argument(
        "--stats-batches",
        type=int,
        default=None,
        help="batches per activation-statistics pass (default: at least 16 images and at least 4 batches)",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--resolution", type=int, default=None, help="training resolution (default: the model's)")
    t.add_argument("--caption-template", default=DEFAULT_TEMPLATE, help="caption for images without .txt")
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
    g.add_argument(
        "--concepts", default="", help="NAME[:STRENGTH],... ; !NAME lists a concept but leaves it off (default: none)"
    )
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
    from ..method.bank import BankError

    try:
        return args.fn(args)
    except (BankError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
