"""``python -m seqlora_core``: train concepts one after another, report, export, import, remove, generate, demo.

Every bad input is an ``error: <flag>: <what and the fix>`` line and exit code 2; Ctrl-C or SIGTERM during
training saves its progress (exit code 130 or 143) and the same command resumes it. A bank is changed only
under its lock, and only ever replaced by a newer version of itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from ..data.captions import DEFAULT_TEMPLATE
from ..method import selection
from ..method.methods import METHODS
from ..method.targets import PRESETS
from .bases import BASES_HELP, TOY

ALLOW_PICKLE_HELP = (
    "read a diffusers --base whose weights are pickle files (.bin): only for models you trust, as loading "
    "pickle can run code"
)


EXIT_ERROR = 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _device(arg: str | None) -> str:
    """The device to run on: ``--device`` checked (ValueError naming it), else CUDA when there is one."""
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: {arg!r} is not a device; use cpu or cuda (cuda:0, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device: {arg!r} was asked for, but this torch build sees no CUDA device; use --device cpu, "
                "or install a CUDA build of torch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {arg!r}; this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device: {arg!r}; no Apple GPU (MPS) is available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device: {arg!r} is not supported; use cpu or cuda")
    return arg


def _flag(message: str) -> str:
    """A TrainConfig message ('lr: ...') with the command-line flag's name ('--lr: ...')."""
    field, sep, rest = message.partition(": ")
    flags = {"lr": "--lr", "checkpoint_every": "--checkpoint-every", "stats_batches": "--stats-batches"}
    if sep and field.isidentifier():
        return f"{flags.get(field, '--' + field.replace('_', '-'))}: {rest}"
    return message


def _positive(value: int | None, flag: str, multiple: int = 1) -> None:
    if value is not None and (value < 1 or value % multiple):
        what = f"a positive multiple of {multiple}" if multiple > 1 else "a whole number >= 1"
        raise ValueError(f"{flag}: {value}; use {what}")


def _suffix(path: str, flag: str, allowed: tuple[str, ...]) -> Path:
    out = Path(path)
    if out.suffix.lower() not in allowed:
        raise ValueError(f"{flag}: {out.name!r}; give a file name ending in {' or '.join(allowed)}")
    if out.is_dir():
        raise ValueError(f"{flag}: {out.name!r} is a folder; give a file name")
    return out


def concept_name(name: str | None, trigger: str) -> str:
    """``--name``, or the trigger's first word without the selection grammar's marks; checked."""
    if name is not None:
        return selection.check_concept_name(name, "--name")
    word = trigger.split()[0] if trigger.split() else ""
    derived = word.strip(",:!").replace(",", "").replace(":", "")
    if not derived:
        raise ValueError(f"--name: the trigger {trigger!r} gives no usable concept name; give one with --name")
    return selection.check_concept_name(derived, "--name (taken from --trigger)")


class StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM during training: the first asks the training loop to stop after the
    current step (its progress is saved); outside the loop, or a second signal, raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.in_loop = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def _handle(self, signum: int, _frame: object) -> None:
        first = self.signal is None
        self.signal = signum
        if not (first and self.in_loop):
            raise KeyboardInterrupt
        print("\nstopping after this step to save the progress (Ctrl-C again stops at once)", file=sys.stderr)

    def should_stop(self) -> bool:
        return self.signal is not None

    def on_phase(self, phase: str) -> None:
        self.in_loop = phase == "train"

    @property
    def exit_code(self) -> int:
        import signal

        return EXIT_SIGTERM if self.signal == signal.SIGTERM else EXIT_SIGINT


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.captions import check_template
    from ..data.dataset import MAX_RESOLUTION
    from ..files import remove_stale_temps, stem_for
    from ..method.bank import BankError, DuplicateConceptError
    from ..method.bank_update import updating_bank
    from ..method.trainer import (
        ResumeMismatchError,
        TrainCallbacks,
        TrainConfig,
        TrainingCancelled,
        discard_checkpoint,
        finished_into,
    )
    from .bases import architecture_of, load_base
    from .recipes import train_from_folder

    trigger = selection.check_trigger(args.trigger, "--trigger")
    name = concept_name(args.name, trigger)
    check_template(args.caption_template, "--caption-template")
    _positive(args.batch_size, "--batch-size")
    _positive(args.stats_batches, "--stats-batches")
    _positive(args.resolution, "--resolution", 8)
    if args.resolution is not None and args.resolution > MAX_RESOLUTION:
        raise ValueError(f"--resolution: {args.resolution}; use at most {MAX_RESOLUTION} (SDXL trains at 1024)")
    _positive(args.prior_images, "--prior-images")
    if args.class_prompt is not None:
        selection.check_trigger(args.class_prompt, "--class-prompt")
    if args.min_snr_gamma is not None and not (math.isfinite(args.min_snr_gamma) and args.min_snr_gamma > 0):
        raise ValueError(
            f"--min-snr-gamma: {args.min_snr_gamma}; give a positive number (5 is typical) or leave it off"
        )
    bank_path = _suffix(args.bank, "--bank", (".safetensors",))
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"--images: image folder not found: {args.images}")
    cfg = TrainConfig(
        name=name,
        triggers=[trigger],
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
        checkpoint_path=str(bank_path.with_name(f"{bank_path.stem}.{stem_for(name)}.partial.safetensors")),
        checkpoint_every=args.checkpoint_every,
        layer_naming="diffusers",
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(_flag(str(e))) from None
    device = _device(args.device)
    stop = StopOnSignal()
    bar = None
    try:
        with stop, updating_bank(bank_path, f"training {name!r}") as update:
            bank = update.bank
            remove_stale_temps(cfg.checkpoint_path)  # what a killed run left half-written
            if finished_into(bank, cfg):
                discard_checkpoint(cfg)
                print(f"{name!r} is already in {bank_path} (its run wrote the bank); removed its progress file")
                return 0
            if bank is not None and name in bank.names():
                raise DuplicateConceptError(
                    f"--name: {name!r} is already in the bank; choose another name, or remove the old concept "
                    f"first (python -m seqlora_core remove --bank {bank_path} --concept {name!r})"
                )
            if args.restart:
                discard_checkpoint(cfg)
            pipe = load_base(args.base, device, allow_pickle=args.allow_pickle)
            cfg.architecture = architecture_of(args.base, pipe)
            bar = tqdm(total=args.steps, desc=f"training {name!r} ({args.method})", unit="step", disable=args.quiet)

            def on_step(info) -> None:
                bar.n = info.step
                bar.set_postfix(loss=f"{info.loss:.4f}", interference=f"{info.interference:.3f}", refresh=False)
                bar.refresh()

            def on_phase(phase: str) -> None:
                stop.on_phase(phase)
                bar.set_description(phase)

            callbacks = TrainCallbacks(on_step=on_step, on_phase=on_phase, should_stop=stop.should_stop)
            try:
                new_bank = train_from_folder(
                    pipe,
                    args.images,
                    trigger,
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
            except ResumeMismatchError as e:
                raise ResumeMismatchError(f"{e}, or add --restart") from None
            except ValueError as e:
                if isinstance(e, BankError):
                    raise
                raise ValueError(_flag(str(e))) from e
            stop.in_loop = False
            bar.close()
            bar = None
            update.commit(new_bank)
            discard_checkpoint(cfg)
    except (KeyboardInterrupt, TrainingCancelled):
        kept = Path(cfg.checkpoint_path).is_file()
        where = f"progress is in {cfg.checkpoint_path}: " if kept else ""
        print(f"interrupted; the bank is unchanged; {where}run the same command to resume", file=sys.stderr)
        return stop.exit_code
    finally:
        if bar is not None:
            bar.close()
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

    png = _suffix(args.png, "--png", IMAGE_SUFFIXES) if args.png else None
    bank = ConceptBank.load(args.bank)
    rep = build_report(bank)
    if args.base == TOY and args.identity:
        from ..toy.evaluation import identity_report
        from .bases import load_base

        rep["identity"] = identity_report(load_base(TOY), bank)
    if png:
        write_heatmap_png(rep, png)
    print(json.dumps(rep, indent=1) if args.json else report_text(rep))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..interop.bank_lora import export_concept, export_target
    from ..method.bank import ConceptBank

    out = _suffix(args.out, "--out", (".safetensors",))
    if out.exists() and Path(args.bank).exists() and os.path.samefile(out, args.bank):
        raise ValueError(f"--out: {out.name} is the bank itself; give the LoRA another file name")
    bank = ConceptBank.load(args.bank)
    bank.concept(args.concept)
    replaced = export_target(out, args.force, "--out")
    path = export_concept(bank, args.concept, out, args.format, args.dtype, overwrite=args.force)
    kept = " (the old file is kept as a .bak copy)" if replaced else ""
    print(f"wrote {path} ({args.format}){kept}; triggers: {', '.join(bank.concept(args.concept).triggers) or 'none'}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from ..interop.bank_lora import import_lora
    from ..method.bank_update import updating_bank

    name = selection.check_concept_name(args.name, "--name")
    triggers = [selection.check_trigger(args.trigger, "--trigger")] if args.trigger is not None else None
    bank_path = _suffix(args.bank, "--bank", (".safetensors",))
    with updating_bank(bank_path, f"importing {name!r}") as update:
        if update.bank is None:
            raise FileNotFoundError(
                f"--bank: {bank_path} does not exist; train a concept first, so the bank knows its layers"
            )
        update.commit(import_lora(update.bank, args.lora, name, triggers))
    print(f"imported {args.lora} as frozen concept {name!r}; later concepts are trained orthogonal to it")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from ..method.bank_update import updating_bank

    bank_path = _suffix(args.bank, "--bank", (".safetensors",))
    with updating_bank(bank_path, f"removing {args.concept!r}") as update:
        if update.bank is None:
            raise FileNotFoundError(f"--bank: {bank_path} does not exist")
        new = update.bank.without(args.concept)
        backup = update.commit(new, backup=True)
    left = ", ".join(new.names()) or "no concepts"
    print(f"removed {args.concept!r}; {bank_path} now holds {left}; the previous version is kept as {backup}")
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

    out = _suffix(args.out, "--out", IMAGE_SUFFIXES)
    if not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps: {args.steps}; use 1..1000 sampling steps (30 is typical)")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance: {args.guidance}; give a finite number (7.5 is typical)")
    items = selection.parse_selection(args.concepts, "--concepts")
    selection.check_strengths(items, "--concepts")
    chosen = selection.enabled_strengths(items)
    device = _device(args.device)
    bank = ConceptBank.load(args.bank)
    for name in chosen:
        bank.concept(name)
    pipe = load_base(args.base, device, allow_pickle=args.allow_pickle)
    with compose(pipe.unet, bank, chosen, mode=args.mode):
        image = generate(pipe, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out}")
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
    t.add_argument("--restart", action="store_true", help="discard saved progress of this concept and start it over")
    t.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("report", help="interference matrix, forgetting bound, capacity")
    r.add_argument("--bank", required=True)
    r.add_argument("--base", default=None, help=BASES_HELP + " (needed only for --identity)")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.add_argument("--png", default=None, help="write the interference heatmap here (.png)")
    r.add_argument("--identity", action="store_true", help="with --base toy: identity score of every concept")
    r.set_defaults(fn=cmd_report)

    e = sub.add_parser("export", help="one concept as an ordinary LoRA file")
    e.add_argument("--bank", required=True)
    e.add_argument("--base", default=None, help="unused; accepted for symmetry with the other commands")
    e.add_argument("--concept", required=True)
    e.add_argument("--format", choices=["kohya", "peft"], default="kohya")
    e.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    e.add_argument("--out", required=True, help="output .safetensors")
    e.add_argument("--force", action="store_true", help="replace an existing file (the old one is kept as a .bak copy)")
    e.set_defaults(fn=cmd_export)

    i = sub.add_parser("import", help="add a foreign LoRA file to a bank as a frozen concept")
    i.add_argument("--bank", required=True)
    i.add_argument("--lora", required=True, help="a kohya, PEFT or ComfyUI-trainer .safetensors LoRA")
    i.add_argument("--name", required=True)
    i.add_argument("--trigger", default=None, help="trigger words (default: the file's metadata)")
    i.set_defaults(fn=cmd_import)

    rm = sub.add_parser("remove", help="drop a concept from a bank (the previous version is kept as a .bak)")
    rm.add_argument("--bank", required=True)
    rm.add_argument("--concept", required=True, help="the concept's name")
    rm.set_defaults(fn=cmd_remove)

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
    g.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    g.set_defaults(fn=cmd_generate)
    return p


def _drop_torchvision_notices(record: logging.LogRecord) -> bool:
    """False for transformers' notice that its image processors fall back to PIL without torchvision:
    diffusers' pipelines import them, the command line never uses them, and the notice asks users to
    install a package they do not need."""
    return "requires torchvision" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("transformers.utils.import_utils").addFilter(_drop_torchvision_notices)
    from ..method.bank import BankError

    try:
        return args.fn(args)
    except (BankError, OSError, ValueError, KeyError, ArithmeticError, RuntimeError) as e:
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_SIGINT
