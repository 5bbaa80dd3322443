"""Command line: ``kandinsky train STAGE --out DIR`` and ``kandinsky finetune decoder|prior --model DIR --data CSV``.

``add_train_parsers(subparsers)`` plugs both into the main ``kandinsky`` CLI; ``main`` serves
``python -m kandinsky.train STAGE --out DIR`` (and ``python -m kandinsky.train finetune ...``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .config import PRESETS
from .stages import STAGES

TRAIN_CHOICES = (*STAGES, "all", "export")
BUNDLED_ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=TRAIN_CHOICES, help="stage to run ('all' runs every stage, then export)")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, logs, caches)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model sizes and schedules (default: bundled; a run folder keeps its first choice)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the run (default 0)")
    p.add_argument("--steps", type=int, default=None, help="override the stage's number of steps")
    p.add_argument("--batch-size", type=int, default=None, help="override the stage's batch size")
    p.add_argument("--force", action="store_true", help="rerun a finished stage (continues from its checkpoint)")
    p.add_argument("--assets", nargs="?", const=BUNDLED_ASSETS, default=None, type=Path,
                   help="export folder (bare --assets: the package's bundled-model folder)")
    p.add_argument("--fp32", action="store_true", help="export fp32 weights (default fp16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("component", choices=("decoder", "prior"))
    p.add_argument("--model", type=Path, default=None,
                   help="diffusers-format folder to fine-tune (default: the bundled model)")
    p.add_argument("--prior", type=Path, default=None,
                   help="prior folder whose CLIP image encoder embeds the images (decoder fine-tuning)")
    p.add_argument("data_pos", nargs="?", type=Path, metavar="DATA", help="the same as --data")
    p.add_argument("--data", type=Path, default=None,
                   help="a folder of images with .txt captions beside them, a JSONL file ({image, text} per line) "
                        "or a CSV (image path, caption)")
    p.add_argument("--out", required=True, type=Path, help="where to write the fine-tuned folder")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adamw")
    p.add_argument("--ema-decay", type=float, default=0.999, help="0 disables the EMA")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
                   help="autocast on CUDA (auto: bf16 where supported, else fp16); CPU runs fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--lora", action="store_true",
                   help="train a LoRA adapter (peft) of the decoder instead of all weights; --out is the adapter "
                        "folder")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--targets", choices=("attn", "attn+conv", "all"), default="attn",
                   help="layers the adapter changes (default: attention projections)")
    p.add_argument("--condition", choices=("image", "prior", "trigger"), default="image",
                   help="decoder image embedding while training: the training image's CLIP embedding (default), "
                        "the prior's sample for the caption (teaches words the prior does not know), or trigger: "
                        "the prior's sample for captions with a --trigger word, the image's embedding for the rest")
    p.add_argument("--text-drop", type=float, default=None, metavar="P",
                   help="share of decoder rows trained without their caption (default: the decoder stage's)")
    p.add_argument("--trigger", action="append", default=[], metavar="WORD",
                   help="trigger word(s) recorded in the adapter's metadata (repeatable)")


def add_train_parsers(subparsers: Any) -> None:
    """Add the ``train`` and ``finetune`` subcommands to an ``argparse`` subparsers object."""
    t = subparsers.add_parser("train", help="train the small bundled-style model (a stage or all)",
                              description="Train the scaled-down Kandinsky 2.1 on generated shapes.")
    _add_train_args(t)
    t.set_defaults(func=run_train)
    f = subparsers.add_parser("finetune", help="fine-tune a decoder or prior folder on image-caption pairs",
                              description="Fine-tune a diffusers-format Kandinsky 2.1 decoder or prior.")
    _add_finetune_args(f)
    f.set_defaults(func=run_finetune)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from .export import export, folder_size
    from .stages import run_all, run_stage
    from .workspace import Workspace

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    if args.stage in STAGES and args.stage not in ("data", "tokenizers") and (args.steps or args.batch_size):
        sched = {k: v for k, v in (("steps", args.steps), ("batch", args.batch_size)) if v}
        overrides = {args.stage: sched}
    ws = Workspace.open(args.out, args.preset, args.seed, progress=not args.no_progress, overrides=overrides)
    dtype = None if args.fp32 else torch.float16
    if args.stage == "all":
        run_all(ws, args.assets, dtype)
    elif args.stage == "export":
        folders = export(ws, args.assets, dtype)
        for name, path in folders.items():
            print(f"{name}: {path} ({folder_size(path) / 1e6:.1f} MB)")
    else:
        run_stage(ws, args.stage, force=args.force)
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    import torch

    from .finetune import FinetuneOptions, finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = FinetuneOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                           ema_decay=args.ema_decay, gradient_checkpointing=args.gradient_checkpointing,
                           mixed_precision=args.mixed_precision, device=args.device, seed=args.seed,
                           save_every=args.save_every, progress=not args.no_progress, lora=args.lora,
                           rank=args.rank, alpha=args.alpha, targets=args.targets, trigger_words=tuple(args.trigger),
                           condition=args.condition, text_drop=args.text_drop)
    data = args.data or args.data_pos
    if data is None:
        raise ValueError("give the training data (DATA or --data)")
    if args.data and args.data_pos:
        raise ValueError("give the training data once (DATA or --data)")
    from ..pipeline import ASSETS

    model = args.model or ASSETS / args.component
    prior = args.prior or (ASSETS / "prior" if args.component == "decoder" and args.model is None else None)
    out = finetune(args.component, model, data, args.out, opts, prior=prior)
    print(f"{'LoRA adapter' if args.lora else 'fine-tuned ' + args.component} written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m kandinsky.train STAGE --out DIR`` or ``python -m kandinsky.train finetune decoder|prior ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "finetune":
        p = argparse.ArgumentParser(prog="python -m kandinsky.train finetune", description=run_finetune.__doc__)
        _add_finetune_args(p)
        return run_finetune(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="python -m kandinsky.train",
                                description="Train the scaled-down Kandinsky 2.1 on generated shapes "
                                            "(or: python -m kandinsky.train finetune ...).")
    _add_train_args(p)
    return run_train(p.parse_args(argv))
