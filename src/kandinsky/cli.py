"""The ``kandinsky`` command line (``python -m kandinsky`` is the same).

Subcommands: ``generate`` (text-to-image), ``mix``, ``img2img``, ``inpaint``, ``variations``, ``morph``,
``convert``, ``info``, ``serve``, ``train`` and ``finetune``. Every image is written with its parameters in the
AUTOMATIC1111 ``parameters`` format (see :mod:`kandinsky.metadata`); ``generate --from IMAGE`` re-runs them.

Errors print one line ``kandinsky: error: ...`` and exit with status 2; unexpected failures exit with 1 and show
their traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import secrets
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import metadata

PROG = "kandinsky"
EXIT_ERROR, EXIT_CRASH = 2, 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ANIMATION_SUFFIXES = (".gif", ".webp")
# kandinsky.diffusion.samplers.SAMPLERS
SAMPLER_CHOICES = ("ddim", "ddpm", "p_sampler", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "unipc_karras")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")
INTERPOLATIONS = ("slerp", "lerp")
COMPATS = ("diffusers", "original")  # kandinsky.pipeline.COMPATS

COMMAND_MODE = {"generate": "txt2img", "img2img": "img2img", "inpaint": "inpaint", "mix": "mix",
                "variations": "variations", "morph": "morph"}
GEN_KEYS = ("prompt", "negative", "width", "height", "steps", "guidance", "sampler", "seed", "num")
PRIOR_KEYS = ("prior_steps", "prior_guidance")
MODE_KEYS: dict[str, tuple[str, ...]] = {
    "txt2img": GEN_KEYS + PRIOR_KEYS,
    "img2img": GEN_KEYS + PRIOR_KEYS + ("image", "strength"),
    "inpaint": GEN_KEYS + PRIOR_KEYS + ("image", "mask"),
    "mix": GEN_KEYS + PRIOR_KEYS + ("items",),
    "variations": GEN_KEYS + ("image",),
    "morph": tuple(k for k in GEN_KEYS if k != "num") + PRIOR_KEYS + ("items", "frames", "interp"),
}
NEEDS = {"txt2img": ("decoder", "prior"), "img2img": ("decoder", "prior"), "inpaint": ("inpaint", "prior"),
         "mix": ("decoder", "prior"), "variations": ("decoder", "prior"), "morph": ("decoder", "prior")}
MODEL_KEYS = ("model", "prior", "inpaint", "original")
RECORD_KEYS = set().union(*MODE_KEYS.values()) | {"mode", "index", "frame", "dtype", "compat"} | set(MODEL_KEYS)
ALIASES = {"negative_prompt": "negative", "guidance_scale": "guidance", "cfg_scale": "guidance",
           "prior_guidance_scale": "prior_guidance", "num_images": "num", "init_image": "image"}
EXAMPLES = {
    "generate": """examples:
  kandinsky generate "a red cat on a blue sofa, oil painting" --seed 42
  kandinsky generate "a lighthouse at dusk" --num 4 --steps 50 --sampler dpmpp_2m -o lighthouse/
  kandinsky generate --from outputs/00001-42-a-red-cat-on-a-blue-sofa-oil-painting.png   # the same image again
  kandinsky generate --prompts jobs.txt -o batch/   # lines: a prompt, --options "prompt", or {"prompt": ..., "seed": 1}
""",
    "mix": """examples:
  kandinsky mix --text "a red cat:0.7" --image photo.png:0.3 --seed 1
  kandinsky mix -t "winter forest" -t "oil painting by Van Gogh" -o mix.png
""",
    "morph": """examples:
  kandinsky morph -t "a red cat" -t "a blue dog" --frames 16 --seed 7 -o morph.gif
  kandinsky morph -i a.png -i b.png -t "a castle" --frames 24 --format webp --boomerang
""",
}
# keys of the pipeline's img.info["kandinsky"] -> record keys
INFO_KEYS = {"width": "width", "height": "height", "steps": "steps", "guidance_scale": "guidance",
             "sampler": "sampler", "prior_steps": "prior_steps", "prior_guidance_scale": "prior_guidance",
             "strength": "strength", "seed": "seed"}


class CLIError(Exception):
    """A usage or input error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors raised as :class:`CLIError` instead of usage + exit."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise CLIError(f"{message} (see `{self.prog} --help`)" if self.add_help else message)


# ================================================================================================ argument types


def _int_type(name: str, minimum: int, multiple: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum or value % multiple:
            what = f"a positive multiple of {multiple}" if multiple > 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {value}")
        return value

    return parse


def _float_type(name: str, low: float = 0.0, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {text}")
        return value

    return parse


class ItemAction(argparse.Action):
    """Collect ``--text``/``--image`` items in command-line order as ``(kind, spec)``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((self.const, values))
        setattr(namespace, self.dest, items)


# ================================================================================================ parser


def _output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output control")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes (results still print)")
    g.add_argument("--json", action="store_true", help="print one JSON object: paths, seeds, parameters, timings")
    g.add_argument("--debug", action="store_true", help="show the traceback of errors")


def _model_flags(p: argparse.ArgumentParser, speed: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="decoder folder (diffusers kandinsky-2-1 layout; default: bundled)")
    g.add_argument("--prior", metavar="DIR", help="prior folder (kandinsky-2-1-prior layout; default: bundled)")
    g.add_argument("--inpaint", metavar="DIR", help="inpainting decoder folder (default: bundled)")
    g.add_argument("--original", metavar="DIR", help="a folder of the original (non-diffusers) checkpoints")
    g.add_argument("--device", choices=DEVICES, help="default: auto (cuda, then mps, then cpu)")
    g.add_argument("--dtype", choices=DTYPES, help="default: auto (float16 on cuda, else float32)")
    g.add_argument("--compat", choices=COMPATS,
                   help="diffusers (default) or original: the ai-forever repository's sampling semantics "
                        "(img2img strength = fraction kept, inpaint mask white = keep)")
    if speed:
        g.add_argument("--low-memory", action="store_true",
                       help="drop each model from memory once its part of a run is done (text encoders, prior, UNet "
                            "packed weights) and decode large images in tiles")
        g.add_argument("--compile", action="store_true",
                       help="run the UNet through torch.compile (slow first run, cached; falls back to eager)")
        g.add_argument("--tile-decode", choices=("auto", "on", "off"), default="auto",
                       help="MoVQ decoding in tiles: auto (above 1024x1024, or 512x512 with --low-memory)")


def _gen_flags(p: argparse.ArgumentParser, *, prior: bool = True, num: bool = True, out: bool = True,
               out_help: str = "", prompt_help: str = "the prompt") -> None:
    g = p.add_argument_group("generation (defaults: the model folder's recorded ones, else the published ones)")
    g.add_argument("-p", "--prompt", help=prompt_help)
    g.add_argument("-n", "--negative", metavar="TEXT", help="negative prompt")
    g.add_argument("-W", "--width", metavar="W", type=_int_type("width", 8, 8), help="width, a multiple of 8 (512)")
    g.add_argument("-H", "--height", metavar="H", type=_int_type("height", 8, 8), help="height, a multiple of 8 (512)")
    g.add_argument("--steps", metavar="N", type=_int_type("steps", 1), help="decoder steps (100)")
    g.add_argument("--guidance", "--cfg-scale", metavar="X", type=_float_type("guidance"),
                   help="decoder CFG scale (4)")
    if prior:
        g.add_argument("--prior-steps", metavar="N", type=_int_type("prior steps", 1), help="prior steps (25)")
        g.add_argument("--prior-guidance", metavar="X", type=_float_type("prior guidance"),
                       help="prior CFG scale (4)")
    g.add_argument("--sampler", choices=SAMPLER_CHOICES, help="decoder sampler (ddim)")
    g.add_argument("--fast", action="store_true",
                   help="the fast preset for unset options (kandinsky.pipeline.PRESETS['fast'], docs/benchmarks.md)")
    g.add_argument("-s", "--seed", metavar="S", type=_int_type("seed", 0),
                   help="random seed (random when absent; always printed)")
    if num:
        g.add_argument("--num", metavar="N", type=_int_type("num", 1),
                       help="images per prompt, drawn from one generator (1)")
    if out:
        g.add_argument("-o", "--out", metavar="PATH",
                       help=out_help or "output file (.png/.jpg/.webp) or folder (default: outputs/)")
        g.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _line_parser(mode: str) -> Parser:
    """The parser of one ``--prompts`` line written as options (``--seed 3 --steps 20 "a red cat"``)."""
    p = Parser(prog="prompts line", add_help=False)
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT")
    _gen_flags(p, prior=mode != "variations", out=False)
    if mode in ("img2img", "inpaint", "variations"):
        p.add_argument("-i", "--image")
    if mode == "img2img":
        p.add_argument("--strength", type=_float_type("strength", 0.0, 1.0))
    if mode == "inpaint":
        p.add_argument("-m", "--mask")
    return p


def build_parser(argv: Sequence[str] = ()) -> Parser:
    """The full ``kandinsky`` parser. ``argv`` decides whether ``train``/``finetune`` are imported."""
    from . import __version__

    parser = Parser(prog=PROG, description="Kandinsky 2.1 text-to-image: generate, mix, edit and morph images.",
                    epilog="Run `kandinsky COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)

    def command(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> Parser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func, command=name)
        return p

    p = command("generate", "text-to-image", cmd_images)
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or --prompt)")
    p.add_argument("--from", dest="from_image", metavar="IMAGE",
                   help="re-run the parameters recorded in IMAGE, any mode (the same image, bit for bit, on the "
                        "same model, device and dtype); options given here override them")
    p.add_argument("--prompts", metavar="FILE", help="batch: one job a line (text or JSONL); re-runs skip done jobs")
    _gen_flags(p)
    _model_flags(p, speed=True)
    _output_flags(p)

    p = command("mix", "mix prompts and images in CLIP space (--text/--image, any number, PROMPT[:WEIGHT])",
                cmd_images)
    p.add_argument("-t", "--text", dest="items", action=ItemAction, const="text", metavar="PROMPT[:WEIGHT]",
                   help="a prompt to mix; the weight is the number after the last colon (default 1)")
    p.add_argument("-i", "--image", dest="items", action=ItemAction, const="image", metavar="PATH[:WEIGHT]",
                   help="an image to mix")
    p.add_argument("--raw-weights", action="store_true",
                   help="use the weights as given (default: divide them by their sum)")
    _gen_flags(p, prompt_help="the decoder's text prompt (default: empty)")
    _model_flags(p, speed=True)
    _output_flags(p)

    for name, help_text in (("img2img", "redraw an image towards a prompt"),
                            ("inpaint", "repaint the white part of a mask"),
                            ("variations", "new images from one image's CLIP embedding")):
        p = command(name, help_text, cmd_images)
        p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or --prompt)")
        p.add_argument("-i", "--image", metavar="PATH", help="the input image")
        if name == "img2img":
            p.add_argument("--strength", type=_float_type("strength", 0.0, 1.0),
                           help="fraction of the trajectory re-drawn, in (0, 1] (default 0.3); with --compat "
                                "original the fraction kept, in [0, 1) (default 0.7)")
        if name == "inpaint":
            p.add_argument("-m", "--mask", metavar="PATH", help="the mask: white = repaint, same size as the image")
        if name != "variations":
            p.add_argument("--prompts", metavar="FILE", help="batch: one job a line (text or JSONL)")
        _gen_flags(p, prior=name != "variations",
                   prompt_help="the decoder's text prompt (default: empty)" if name == "variations" else "the prompt")
        _model_flags(p, speed=True)
        _output_flags(p)

    p = command("morph", "an animation between prompts/images (interpolated image embeddings, fixed noise)",
                cmd_morph)
    p.add_argument("-t", "--text", dest="items", action=ItemAction, const="text", metavar="PROMPT",
                   help="a key frame prompt (in order; two or more key frames in all)")
    p.add_argument("-i", "--image", dest="items", action=ItemAction, const="image", metavar="PATH",
                   help="a key frame image")
    p.add_argument("--frames", type=_int_type("frames", 2), help="frames in all, key frames included (default 16)")
    p.add_argument("--interp", choices=INTERPOLATIONS,
                   help="slerp (default: spherical on directions, linear on norms) or lerp")
    p.add_argument("--fps", type=_float_type("fps", 0.0, 100.0, low_open=True), default=8.0,
                   help="frames per second (default 8)")
    p.add_argument("--format", choices=("gif", "webp"), help="animation format when --out is a folder (default gif)")
    p.add_argument("--boomerang", action="store_true", help="play forwards then backwards")
    p.add_argument("--no-frames", action="store_true", help="write only the animation, not the frame PNGs")
    _gen_flags(p, num=False, prompt_help="the decoder's text prompt for every frame (default: empty)",
               out_help="animation file (.gif/.webp; frames go to NAME-frames/) or folder (default: outputs/)")
    _model_flags(p, speed=True)
    _output_flags(p)

    p = command("convert", "convert model weights (original checkpoints, diffusers folders, safetensors)",
                cmd_convert)
    p.add_argument("src", metavar="SRC", help="source model folder or checkpoint")
    p.add_argument("dst", metavar="DST", help="destination folder")
    p.add_argument("--to", choices=("diffusers", "safetensors"),
                   help="diffusers: an original file set -> decoder/prior/inpaint folders (default); "
                        "safetensors: any weights file or folder -> .safetensors")
    p.add_argument("--dtype", choices=("fp16", "fp32", "bf16"),
                   help="output precision (default: fp32 for diffusers, unchanged for safetensors)")
    p.add_argument("--clip-tokenizer", metavar="PATH",
                   help="CLIP tokenizer folder or OpenAI's bpe_simple_vocab_16e6.txt.gz (original file sets)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    _output_flags(p)

    p = command("info", "print an image's generation parameters, or a model folder's components", cmd_info)
    p.add_argument("path", nargs="?", metavar="PATH", help="an image, or a model folder (default: the bundled model)")
    _output_flags(p)

    p = command("serve", "run the HTTP server and web page (the /v1 API, A1111's /sdapi/v1 subset, a page at /)",
                cmd_serve)
    from .server.config import add_serve_arguments

    add_serve_arguments(p)
    _model_flags(p)
    _output_flags(p)

    _add_train(sub, command, argv)
    return parser


def _add_train(sub: Any, command: Callable[..., Parser], argv: Sequence[str]) -> None:
    """``train``/``finetune`` come from :mod:`kandinsky.train.cli`; imported only when they are asked for."""
    wanted = next((a for a in argv if not a.startswith("-")), None)
    if wanted in ("train", "finetune"):
        module = _optional_module("kandinsky.train.cli", f"kandinsky {wanted}", required=False)
        if module is not None:
            module.add_train_parsers(sub)
            return
    for name, help_text in (("train", "train the small bundled-style model (a stage or all)"),
                            ("finetune", "fine-tune a decoder or prior folder on image-caption pairs")):
        p = command(name, help_text, _missing_train)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _missing_train(args: argparse.Namespace) -> int:
    raise CLIError(f"kandinsky {args.command}: training is not installed in this version")


def _optional_module(name: str, what: str, required: bool = True) -> Any:
    """Import a part of kandinsky that may be absent from this version: a one-line error (or None) if it is."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if name == missing or name.startswith(missing + "."):
            if not required:
                return None
            raise CLIError(f"{what} is not installed in this version") from exc
        raise CLIError(f"{what} needs the '{missing}' package; install it") from exc


# ================================================================================================ jobs


def split_weight(spec: str, kind: str) -> tuple[str, float | None]:
    """``"PROMPT[:WEIGHT]"`` -> (prompt, weight or None): the weight is a number after the last colon."""
    if kind == "image" and Path(spec).is_file():
        return spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return spec, None
        if math.isfinite(weight):
            return head, weight
    return spec, None


def _items_from_args(specs: list[tuple[str, str]] | None, mode: str, raw: bool) -> list[dict[str, Any]] | None:
    if not specs:
        return None
    items, weights = [], []
    for kind, spec in specs:
        value, weight = split_weight(spec, kind) if mode == "mix" else (spec, None)
        items.append({kind: str(Path(value).resolve()) if kind == "image" else value})
        weights.append(1.0 if weight is None else weight)
    if mode == "mix":
        if not raw:
            total = sum(weights)
            if not total > 0:
                raise CLIError(f"the mix weights sum to {total:g}; they are divided by their sum, so it must be "
                               "positive (or pass --raw-weights)")
            weights = [w / total for w in weights]
        for item, weight in zip(items, weights, strict=True):
            item["weight"] = weight
    return items


def job_from_args(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The options given on the command line for ``mode`` (absent options are left out)."""
    job: dict[str, Any] = {}
    pos = getattr(args, "prompt_pos", None)
    if pos is not None:
        if getattr(args, "prompt", None) is not None:
            raise CLIError("give the prompt once: either as an argument or with --prompt")
        job["prompt"] = pos
    for key in MODE_KEYS[mode]:
        value = getattr(args, key, None)
        if key == "items":
            value = _items_from_args(value, mode, getattr(args, "raw_weights", False))
        elif key in ("image", "mask") and value is not None:
            value = str(Path(value).resolve())
        if value is not None:
            job[key] = value
    if getattr(args, "fast", False):  # explicit values, so that the record regenerates the same image
        from .pipeline import PRESETS

        for key, value in PRESETS["fast"].items():
            if key in MODE_KEYS[mode]:
                job.setdefault(key, value)
    return job


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_job(job: dict[str, Any]) -> None:
    """Fast checks before any model is loaded: sizes, counts, input images readable, mask size."""
    from . import imaging

    mode = job["mode"]
    for key in ("width", "height"):
        v = job.get(key)
        if v is not None and (not _is_int(v) or v <= 0 or v % 8):
            raise ValueError(f"{key} must be a positive multiple of 8, got {v!r}")
    for key in ("steps", "prior_steps", "num", "frames"):
        v = job.get(key)
        if v is not None and (not _is_int(v) or v < 1):
            raise ValueError(f"{key} must be a positive integer, got {v!r}")
    seed = job.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    for key in ("guidance", "prior_guidance", "strength"):
        v = job.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0):
            raise ValueError(f"{key} must be a non-negative number, got {v!r}")
    if job.get("strength") is not None and not 0 <= job["strength"] <= 1:  # the pipeline checks the end points
        raise ValueError(f"strength must be in [0, 1], got {job['strength']!r}")
    if job.get("sampler") is not None and job["sampler"] not in SAMPLER_CHOICES:
        raise ValueError(f"unknown sampler {job['sampler']!r}; choose one of {', '.join(SAMPLER_CHOICES)}")
    for key in ("prompt", "negative"):
        if job.get(key) is not None and not isinstance(job[key], str):
            raise ValueError(f"{key} must be a string, got {job[key]!r}")
    if mode in ("txt2img", "img2img", "inpaint") and job.get("prompt") is None:
        raise ValueError("no prompt given; pass PROMPT or --prompt")
    if mode in ("img2img", "inpaint", "variations"):
        if not job.get("image"):
            raise ValueError(f"{COMMAND_MODE.get(mode, mode)} needs an input image: pass --image PATH")
        image = imaging.open_image(job["image"], "image")
        if mode == "inpaint":
            if not job.get("mask"):
                raise ValueError("inpaint needs a mask: pass --mask PATH (white = repaint)")
            mask = imaging.open_image(job["mask"], "mask")
            if mask.size != image.size:
                raise ValueError(f"mask is {mask.width}×{mask.height} but the image is {image.width}×{image.height}; "
                                 "give a mask of the image's size")
    if mode in ("mix", "morph"):
        items = job.get("items") or []
        least = 2 if mode == "morph" else 1
        if len(items) < least:
            raise ValueError(f"{mode} needs at least {least} --text/--image item{'s' if least > 1 else ''}")
        for item in items:
            if not isinstance(item, dict) or not ({"text", "image"} & set(item)):
                raise ValueError(f"bad {mode} item {item!r}: expected {{'text': ...}} or {{'image': ...}}")
            if "image" in item:
                imaging.open_image(item["image"], "image")
        if mode == "morph" and job.get("frames") is not None and job["frames"] < len(items):
            raise ValueError(f"--frames {job['frames']} is fewer than the {len(items)} key frames")


# ================================================================================================ models


def _bundled(role: str) -> Path:
    from .pipeline import ASSETS

    folder = ASSETS / role
    if not folder.is_dir():
        flag = {"decoder": "--model", "prior": "--prior", "inpaint": "--inpaint"}[role]
        raise FileNotFoundError(f"no bundled {role} model in {ASSETS}; pass {flag} DIR (a diffusers-format folder)")
    return folder


def model_choice(args: argparse.Namespace, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model folders and dtype: the command line's, else those recorded in a ``--from`` image, else bundled."""
    chosen: dict[str, Any] = {key: getattr(args, key, None) for key in MODEL_KEYS}
    chosen["dtype"] = getattr(args, "dtype", None)
    chosen["compat"] = getattr(args, "compat", None) or (record or {}).get("compat")
    if record and not chosen["original"]:
        given = any(chosen[k] for k in ("model", "prior", "inpaint"))
        for key in ("model", "prior", "inpaint") if given else MODEL_KEYS:
            path = record.get(key)
            if chosen[key] or not path:
                continue
            if Path(path).exists():
                chosen[key] = path
            else:
                _note(args, f"the recorded {key} folder {path} is missing; using the default")
    if record and chosen["dtype"] is None:
        chosen["dtype"] = record.get("dtype")
    return chosen


def load_pipeline(args: argparse.Namespace, need: Sequence[str], choice: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Load the parts ``need`` names; returns (pipeline, what the record notes about the model)."""
    import torch

    from .pipeline import Kandinsky21, resolve_device

    device = resolve_device(getattr(args, "device", None) or "auto")
    dtype = choice.get("dtype") or "auto"
    if dtype == "auto":
        dtype = "float16" if device.type == "cuda" else "float32"
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    compat = choice.get("compat") or "diffusers"
    noted: dict[str, Any] = {"dtype": dtype, "compat": compat}
    speed = dict(low_memory=bool(getattr(args, "low_memory", False)), compile=bool(getattr(args, "compile", False)),
                 tile_decode={"on": True, "off": False}.get(getattr(args, "tile_decode", None) or "auto"))
    if choice.get("original"):
        original = _optional_module("kandinsky.weights.original_format", "--original (the original checkpoint format)")
        folder = Path(choice["original"])
        if not folder.is_dir():
            raise FileNotFoundError(f"original model folder not found: {folder}")
        decoder, prior, inpaint = original.load_original(folder, device=device, dtype=torch_dtype,
                                                         inpaint=None if "inpaint" in need else False)
        if "inpaint" in need and inpaint is None:
            raise FileNotFoundError(f"{folder} has no inpainting checkpoint")
        pipe = Kandinsky21(decoder=decoder if "decoder" in need else None, prior=prior,
                           inpaint=inpaint if "inpaint" in need else None, device=device, dtype=torch_dtype,
                           compat=compat, **speed)
        noted["original"] = str(folder.resolve())
        return pipe, noted
    folders: dict[str, Any] = {}
    for role, key in (("decoder", "model"), ("prior", "prior"), ("inpaint", "inpaint")):
        if role not in need:
            continue
        given = choice.get(key)
        folder = Path(given) if given else _bundled(role)
        if given and not folder.is_dir():
            raise FileNotFoundError(f"{role} model folder not found: {folder}")
        folders[role] = folder
        noted[key] = str(folder.resolve()) if given else None
    pipe = Kandinsky21.from_pretrained(decoder=folders.get("decoder"), prior=folders.get("prior"),
                                       inpaint=folders.get("inpaint"), device=device, dtype=dtype, compat=compat,
                                       **speed)
    return pipe, noted


# ================================================================================================ running


def _resolved(pipe: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Fill unset sizes/steps/guidance/sampler from the model folder's defaults, then the published ones."""
    resolve = pipe.resolve
    a = resolve("decoder", width=job.get("width"), height=job.get("height"), steps=job.get("steps"),
                guidance_scale=job.get("guidance"), sampler=job.get("sampler"), prior_steps=job.get("prior_steps"),
                prior_guidance_scale=job.get("prior_guidance"))
    return {INFO_KEYS[k]: v for k, v in a.items()}


def _call_kwargs(job: dict[str, Any], prior: bool = True) -> dict[str, Any]:
    kw = dict(width=job.get("width"), height=job.get("height"), steps=job.get("steps"),
              guidance_scale=job.get("guidance"), sampler=job.get("sampler"), seed=job["seed"],
              num_images=job.get("num") or 1)
    if prior:
        kw.update(prior_steps=job.get("prior_steps"), prior_guidance_scale=job.get("prior_guidance"))
    return kw


def run_images(pipe: Any, job: dict[str, Any]) -> list[Any]:
    """Run one image job (any mode but morph); returns the PIL images."""
    mode = job["mode"]
    if mode == "txt2img":
        return pipe.text_to_image(job["prompt"], job.get("negative"), **_call_kwargs(job))
    if mode == "img2img":
        extra = {"strength": job["strength"]} if job.get("strength") is not None else {}
        return pipe.img2img(job["image"], job["prompt"], job.get("negative"), **extra, **_call_kwargs(job))
    if mode == "inpaint":
        return pipe.inpaint(job["image"], job["mask"], job["prompt"], job.get("negative"), **_call_kwargs(job))
    if mode == "mix":
        items = [it["text"] if "text" in it else Path(it["image"]) for it in job["items"]]
        weights = [float(it.get("weight", 1.0)) for it in job["items"]]
        return pipe.mix(items, weights, job.get("prompt") or "", negative_prompt=job.get("negative") or "",
                        **_call_kwargs(job))
    if mode == "variations":
        return pipe.variations(job["image"], job.get("prompt") or "", negative_prompt=job.get("negative"),
                               **_call_kwargs(job, prior=False))
    raise ValueError(f"unknown mode {mode!r}")


def make_record(job: dict[str, Any], info: dict[str, Any], model: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The metadata record of one output image."""
    from . import __version__

    record = {k: v for k, v in job.items() if k in RECORD_KEYS and k not in (*MODEL_KEYS, "dtype", "compat")}
    record.setdefault("negative", None)
    for key, name in INFO_KEYS.items():
        if info.get(key) is not None:
            record[name] = info[key]
    record.update(extra)
    for key in MODEL_KEYS:
        if model.get(key):
            record[key] = model[key]
    record["dtype"] = model.get("dtype")
    record["compat"] = model.get("compat", "diffusers")
    record["version"] = __version__
    return record


def slerp(a: Any, b: Any, t: float) -> Any:
    """Spherical interpolation of directions with linearly interpolated norms (rows of ``a`` and ``b``)."""
    import torch

    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    ua, ub = a64 / na.clamp_min(1e-12), b64 / nb.clamp_min(1e-12)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1, 1))
    so = torch.sin(omega)
    safe = so.abs() > 1e-6
    w_a = torch.where(safe, torch.sin((1 - t) * omega) / torch.where(safe, so, 1), torch.full_like(so, 1 - t))
    w_b = torch.where(safe, torch.sin(t * omega) / torch.where(safe, so, 1), torch.full_like(so, t))
    direction = w_a * ua + w_b * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (direction * ((1 - t) * na + t * nb)).to(a.dtype)


def morph_path(keys: list[Any], frames: int, interp: str) -> list[Any]:
    """``frames`` embeddings walking through the key embeddings at constant parameter speed."""
    out = []
    segments = len(keys) - 1
    for i in range(frames):
        pos = i * segments / (frames - 1)
        j = min(int(pos), segments - 1)
        t = pos - j
        a, b = keys[j], keys[j + 1]
        out.append(slerp(a, b, t) if interp == "slerp" else (a.double() * (1 - t) + b.double() * t).to(a.dtype))
    return out


def run_morph(pipe: Any, job: dict[str, Any], frames: Sequence[int], bar: Any = None) -> list[tuple[int, Any]]:
    """Decode the chosen frame indices of a morph; every frame uses the same seed, hence the same noise."""
    a = _resolved(pipe, job)
    seed, total = job["seed"], job.get("frames") or 16
    keys = []
    for item in job["items"]:
        if "text" in item:
            keys.append(pipe.prior_embeds(item["text"], None, a["prior_steps"], a["prior_guidance"], seed=seed).image)
        else:
            keys.append(pipe.image_embeds([Path(item["image"])]))
    if job.get("negative") is None:
        negative = pipe.zero_image_embeds(1)
    else:
        negative = pipe.prior_embeds(job["negative"], None, a["prior_steps"], a["prior_guidance"], seed=seed).image
    path = morph_path(keys, total, job.get("interp") or "slerp")
    out = []
    for i in frames:
        img = pipe.text_to_image(job.get("prompt") or "", image_embeds=path[i], negative_image_embeds=negative,
                                 width=a["width"], height=a["height"], steps=a["steps"], guidance_scale=a["guidance"],
                                 sampler=a["sampler"], seed=seed)[0]
        img.info.setdefault("kandinsky", {}).update(prior_steps=a["prior_steps"],
                                                    prior_guidance_scale=a["prior_guidance"])
        out.append((i, img))
        if bar is not None:
            bar.update(1)
    return out


# ================================================================================================ outputs


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^\w]+", "-", text.lower(), flags=re.UNICODE).strip("-_")
    return s[:limit].rstrip("-_") or "image"


def job_slug(job: dict[str, Any]) -> str:
    if job.get("prompt"):
        return slug(job["prompt"])
    texts = [it["text"] for it in job.get("items") or [] if "text" in it]
    return slug("-".join([job["mode"], *texts]))


def ensure_folder(folder: Path) -> Path:
    """Create ``folder`` if needed and check that it can be written to."""
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"output folder {folder} is a file; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"output folder {folder} is not writable")
    return folder


class Outputs:
    """Output names: ``--out`` a file (``NAME-2.png`` for further images) or a folder of numbered images."""

    def __init__(self, out: str | None, overwrite: bool = False, suffixes: tuple[str, ...] = IMAGE_SUFFIXES):
        self.path = Path(out) if out else Path("outputs")
        self.overwrite = overwrite
        self.is_file = self.path.suffix.lower() in suffixes
        self.folder = ensure_folder(self.path.parent if self.is_file else self.path)
        self._counter: int | None = None

    def next_number(self) -> int:
        if self._counter is None:
            found = [int(m.group(1)) for p in self.folder.iterdir() if (m := re.match(r"(\d+)-", p.name))]
            self._counter = max(found, default=0)
        self._counter += 1
        return self._counter

    def names(self, count: int, seed: int, name: str, suffix: str = ".png") -> list[Path]:
        if self.is_file:
            p = self.path
            paths = [p] if count == 1 else [p.with_name(f"{p.stem}-{i + 1}{p.suffix}") for i in range(count)]
            for path in paths:
                if path.exists() and not self.overwrite:
                    raise FileExistsError(f"{path} already exists; pass --overwrite or choose another --out")
            return paths
        return [self.folder / f"{self.next_number():05d}-{seed}-{name}{suffix}" for _ in range(count)]


# ================================================================================================ batch files


def read_prompts(path: Path, mode: str) -> list[tuple[int, dict[str, Any] | Exception]]:
    """Jobs of a ``--prompts`` file: (line number, overrides or the error that line has).

    A line is a prompt, options (``--seed 3 --steps 20 "a cat"``) or a JSON object (``{"prompt": ..., "seed": 3}``).
    Blank lines and ``#`` comments are skipped.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompts file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompts file {path} is not UTF-8 text: {exc}") from None
    allowed = set(MODE_KEYS[mode])
    jobs: list[tuple[int, dict[str, Any] | Exception]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise ValueError("a JSON line must be an object")
                job = {ALIASES.get(k, k): v for k, v in obj.items()}
                unknown = sorted(set(job) - allowed)
                if unknown:
                    raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                                     f"use {', '.join(sorted(allowed))}")
            elif line.startswith("-"):
                try:
                    words = shlex.split(line)
                except ValueError as exc:
                    raise ValueError(f"cannot split the options: {exc}") from None
                ns = _line_parser(mode).parse_args(words)
                job = {k: v for k, v in vars(ns).items() if v is not None and k != "prompt_pos"}
                if ns.prompt_pos is not None:
                    job["prompt"] = ns.prompt_pos
            else:
                job = {"prompt": line}
            for key in ("image", "mask"):
                if isinstance(job.get(key), str):
                    job[key] = str(Path(job[key]).resolve())
            jobs.append((number, job))
        except (ValueError, CLIError) as exc:
            jobs.append((number, exc))
    return jobs


# ================================================================================================ commands


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _note(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        _write(f"{PROG}: {message}", sys.stderr)


def _write(message: str, file: Any) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(message, file=file)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(message, file=file)


def _emit(args: argparse.Namespace, message: str) -> None:
    """A result line on stdout (not with --json, where the JSON object is the result)."""
    if not args.json:
        _write(message, sys.stdout)


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2, default=str))


def _bar(args: argparse.Namespace, total: int, desc: str, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not _show_progress(args), dynamic_ncols=True,
                file=sys.stderr)


def _new_seed() -> int:
    return secrets.randbelow(2**32)


def cmd_images(args: argparse.Namespace) -> int:
    """generate, mix, img2img, inpaint, variations: single runs, ``--from`` re-runs and ``--prompts`` batches."""
    start = time.perf_counter()
    mode = COMMAND_MODE[args.command]
    record = None
    index = None
    if getattr(args, "from_image", None):
        if getattr(args, "prompts", None):
            raise CLIError("--from and --prompts cannot be combined")
        record = metadata.read_record(args.from_image)
        mode = record.get("mode") or "txt2img"
        if mode == "morph":
            return _morph_from(args, record, start)
        if mode not in MODE_KEYS:
            raise ValueError(f"{args.from_image} records an unknown mode {mode!r}")
        base = {k: v for k, v in record.items() if k in MODE_KEYS[mode]}
        given = job_from_args(args, "txt2img")
        base.update({k: v for k, v in given.items() if k in MODE_KEYS[mode]})
        if "num" not in given and record.get("index") is not None:
            index = int(record["index"])
        base["num"] = base.get("num") or 1
    else:
        base = job_from_args(args, mode)
    base["mode"] = mode
    choice = model_choice(args, record)
    prompts_file = getattr(args, "prompts", None)
    if prompts_file:
        return _run_batch(args, mode, base, Path(prompts_file), choice, start)

    check_job(base)
    if index is not None and index >= base["num"]:
        raise ValueError(f"the recorded batch position {index} is outside the batch of {base['num']}")
    outputs = Outputs(args.out, args.overwrite)
    if base.get("seed") is None:
        base["seed"] = _new_seed()
    count = 1 if index is not None else base.get("num") or 1
    paths = outputs.names(count, base["seed"], job_slug(base))

    t0 = time.perf_counter()
    pipe, model = load_pipeline(args, NEEDS[mode], choice)
    pipe.set_progress(_show_progress(args))
    t1 = time.perf_counter()
    _note(args, f"seed {base['seed']}")
    images = run_images(pipe, base)
    t2 = time.perf_counter()
    num = base.get("num") or 1
    picks = [index] if index is not None else list(range(len(images)))
    results = []
    for path, i in zip(paths, picks, strict=True):
        img = images[i]
        rec = make_record(base, img.info.get("kandinsky", {}), model, num=num, index=i)
        metadata.save_image(img, path, rec, overwrite=args.overwrite)
        results.append({"path": str(path), "seed": rec["seed"], "index": i, "parameters": rec})
        where = f", image {i + 1} of {num}" if num > 1 else ""
        _emit(args, f"{path}  (seed {rec['seed']}{where})")
    timings = {"load_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3),
               "total_s": round(time.perf_counter() - start, 3)}
    if args.json:
        _print_json({"ok": True, "command": args.command, "mode": mode, "seed": base["seed"], "images": results,
                     "timings": timings})
    return 0


def _run_batch(args: argparse.Namespace, mode: str, base: dict[str, Any], path: Path, choice: dict[str, Any],
               start: float) -> int:
    """Run every line of a prompts file; bad lines are reported and skipped, done outputs are not redone.

    Lines override the command line's options (a prompt given there is the default of lines without one). Output
    names come from the line number and prompt (``00003-a-red-cat.png``), so a re-run skips finished lines.
    """
    if args.out and Path(args.out).suffix.lower() in IMAGE_SUFFIXES:
        raise CLIError("with --prompts, --out must be a folder")
    lines = read_prompts(path, mode)
    if not lines:
        raise ValueError(f"prompts file {path} has no jobs")
    outputs = Outputs(args.out, args.overwrite)
    done: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []

    def fail(number: int, exc: BaseException) -> None:
        message = _one_line(exc)
        errors.append({"line": number, "error": message})
        _write(f"{PROG}: error: {path}:{number}: {message}", sys.stderr)

    todo: list[tuple[int, dict[str, Any], list[Path]]] = []
    for number, parsed in lines:
        try:
            if isinstance(parsed, Exception):
                raise parsed
            job = {**base, **parsed, "mode": mode}
            check_job(job)
            num, name = job.get("num") or 1, job_slug(job)
            paths = [outputs.folder / (f"{number:05d}-{name}.png" if num == 1 else f"{number:05d}-{k + 1}-{name}.png")
                     for k in range(num)]
        except (CLIError, ValueError, OSError) as exc:
            fail(number, exc)
            continue
        if not args.overwrite and all(p.exists() for p in paths):
            skipped.append({"line": number, "paths": [str(p) for p in paths]})
            _note(args, f"{path}:{number}: done already, skipped ({paths[0].name})")
        else:
            todo.append((number, job, paths))

    load_s = 0.0
    if todo:  # a model that cannot load stops the batch: that is not one line's fault
        t0 = time.perf_counter()
        pipe, model = load_pipeline(args, NEEDS[mode], choice)
        pipe.set_progress(_show_progress(args))
        load_s = time.perf_counter() - t0
    bar = _bar(args, len(todo), "batch", "job")
    for number, job, paths in todo:
        try:
            if job.get("seed") is None:
                job["seed"] = _new_seed()
            t0 = time.perf_counter()
            images = run_images(pipe, job)
            seconds = round(time.perf_counter() - t0, 3)
            for i, (img, p) in enumerate(zip(images, paths, strict=True)):
                if p.exists() and not args.overwrite:
                    continue  # kept from an interrupted run
                rec = make_record(job, img.info.get("kandinsky", {}), model, num=len(images), index=i)
                metadata.save_image(img, p, rec, overwrite=args.overwrite)
                done.append({"line": number, "path": str(p), "seed": rec["seed"], "index": i, "seconds": seconds,
                             "parameters": rec})
                _emit(args, f"{p}  (line {number}, seed {rec['seed']})")
        except (CLIError, ValueError, OSError) as exc:
            fail(number, exc)
        finally:
            bar.update(1)
    bar.close()
    _note(args, f"batch: {len(done)} image(s) written, {len(skipped)} job(s) skipped, {len(errors)} failed")
    if args.json:
        _print_json({"ok": not errors, "command": args.command, "mode": mode, "prompts": str(path), "images": done,
                     "skipped": skipped, "errors": errors,
                     "timings": {"load_s": round(load_s, 3), "total_s": round(time.perf_counter() - start, 3)}})
    return EXIT_ERROR if errors else 0


def _morph_outputs(args: argparse.Namespace, job: dict[str, Any]) -> tuple[Path, Path | None]:
    """(animation file, frames folder or None)."""
    out = Path(args.out) if args.out else Path("outputs")
    suffix = out.suffix.lower()
    if suffix in ANIMATION_SUFFIXES:
        if args.format and f".{args.format}" != suffix:
            raise CLIError(f"--format {args.format} does not match --out {out}")
        ensure_folder(out.parent)
        anim, frames = out, (None if args.no_frames else out.with_name(f"{out.stem}-frames"))
    elif suffix:
        raise CLIError(f"morph --out must be a .gif or .webp file, or a folder; got {out}")
    else:
        folder = Outputs(str(out))
        sub = folder.folder / f"{folder.next_number():05d}-{job['seed']}-{job_slug(job)}"
        anim = sub / f"morph.{args.format or 'gif'}"
        frames = None if args.no_frames else sub
    if not args.overwrite:
        if anim.exists():
            raise FileExistsError(f"{anim} already exists; pass --overwrite or choose another --out")
        if frames is not None and frames.is_dir() and any(frames.glob("frame-*.png")):
            raise FileExistsError(f"{frames} already holds frames; pass --overwrite or choose another --out")
    ensure_folder(anim.parent)
    if frames is not None:
        ensure_folder(frames)
    return anim, frames


def save_animation(frames: list[Any], path: Path, fps: float, boomerang: bool, overwrite: bool) -> Path:
    """An endlessly looping GIF or WebP of the frames."""
    seq = list(frames) + (list(reversed(frames[1:-1])) if boomerang else [])
    fmt = "WEBP" if path.suffix.lower() == ".webp" else "GIF"
    extra = {"quality": 90} if fmt == "WEBP" else {}
    try:
        with open(path, "wb" if overwrite else "xb") as f:
            seq[0].save(f, format=fmt, save_all=True, append_images=seq[1:], duration=round(1000 / fps), loop=0,
                        **extra)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass --overwrite or choose another --out") from None
    return path


def cmd_morph(args: argparse.Namespace) -> int:
    """A smooth sequence between key frames: interpolate their image embeddings, decode with fixed noise."""
    start = time.perf_counter()
    job = job_from_args(args, "morph")
    job["mode"] = "morph"
    job.setdefault("frames", 16)
    job.setdefault("interp", "slerp")
    check_job(job)
    if job.get("seed") is None:
        job["seed"] = _new_seed()
    anim, frames_dir = _morph_outputs(args, job)
    t0 = time.perf_counter()
    pipe, model = load_pipeline(args, NEEDS["morph"], model_choice(args))
    pipe.set_progress(_show_progress(args))
    t1 = time.perf_counter()
    _note(args, f"seed {job['seed']}")
    bar = _bar(args, job["frames"], "frames", "frame")
    made = run_morph(pipe, job, range(job["frames"]), bar)
    bar.close()
    t2 = time.perf_counter()
    results = []
    for i, img in made:
        rec = make_record(job, img.info.get("kandinsky", {}), model, frame=i)
        if frames_dir is not None:
            path = metadata.save_image(img, frames_dir / f"frame-{i + 1:03d}.png", rec, overwrite=args.overwrite)
            results.append({"path": str(path), "frame": i, "seed": rec["seed"]})
    save_animation([img for _, img in made], anim, args.fps, args.boomerang, args.overwrite)
    _emit(args, f"{anim}  (seed {job['seed']}, {job['frames']} frames"
                + (f" in {frames_dir})" if frames_dir is not None else ")"))
    if args.json:
        rec = make_record(job, made[0][1].info.get("kandinsky", {}), model)
        rec.pop("frame", None)
        _print_json({"ok": True, "command": "morph", "seed": job["seed"], "animation": str(anim),
                     "frames": results, "parameters": rec,
                     "timings": {"load_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3),
                                 "total_s": round(time.perf_counter() - start, 3)}})
    return 0


def _morph_from(args: argparse.Namespace, record: dict[str, Any], start: float) -> int:
    """``generate --from FRAME.png`` of a morph frame: re-decode that one frame."""
    job = {k: v for k, v in record.items() if k in MODE_KEYS["morph"]}
    given = job_from_args(args, "txt2img")
    job.update({k: v for k, v in given.items() if k in MODE_KEYS["morph"]})
    job["mode"] = "morph"
    check_job(job)
    job.setdefault("seed", _new_seed())
    frame = int(record.get("frame") or 0)
    outputs = Outputs(args.out, args.overwrite)
    path = outputs.names(1, job["seed"], job_slug(job))[0]
    t0 = time.perf_counter()
    pipe, model = load_pipeline(args, NEEDS["morph"], model_choice(args, record))
    pipe.set_progress(_show_progress(args))
    t1 = time.perf_counter()
    [(i, img)] = run_morph(pipe, job, [frame])
    rec = make_record(job, img.info.get("kandinsky", {}), model, frame=i)
    metadata.save_image(img, path, rec, overwrite=args.overwrite)
    _emit(args, f"{path}  (seed {rec['seed']}, morph frame {i + 1} of {job.get('frames')})")
    if args.json:
        _print_json({"ok": True, "command": args.command, "mode": "morph", "seed": rec["seed"],
                     "images": [{"path": str(path), "seed": rec["seed"], "frame": i, "parameters": rec}],
                     "timings": {"load_s": round(t1 - t0, 3), "generate_s": round(time.perf_counter() - t1, 3),
                                 "total_s": round(time.perf_counter() - start, 3)}})
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """An image's parameters (A1111 text) or a model folder's components."""
    if args.path is None:
        from .pipeline import ASSETS

        if not any((ASSETS / r).is_dir() for r in ("decoder", "prior", "inpaint")):
            raise FileNotFoundError(f"no bundled model in {ASSETS}; pass a model folder or an image")
        target = ASSETS
    else:
        target = Path(args.path)
    if target.is_dir():
        info = metadata.describe_model(target)
        if args.json:
            _print_json(info)
        else:
            print(metadata.format_model_info(info))
        return 0
    meta = metadata.read_metadata(target)
    if meta["parameters"] is None and meta["record"] is None:
        raise ValueError(f"{target} carries no generation parameters")
    if args.json:
        _print_json({"path": str(target), **meta})
    else:
        print(meta["parameters"] if meta["parameters"] is not None else metadata.build_parameters(meta["record"]))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert weights with :func:`kandinsky.weights.convert.convert`."""
    module = _optional_module("kandinsky.weights.convert", "kandinsky convert (weight conversion)")
    kwargs: dict[str, Any] = {"progress": _show_progress(args), "overwrite": args.overwrite}
    for key in ("to", "dtype", "clip_tokenizer"):
        if getattr(args, key, None):
            kwargs[key] = getattr(args, key)
    start = time.perf_counter()
    written = module.convert(args.src, args.dst, **kwargs)
    written = [str(p) for p in written] if isinstance(written, list | tuple) else [str(written or args.dst)]
    seconds = round(time.perf_counter() - start, 3)
    if args.json:
        _print_json({"ok": True, "command": "convert", "src": args.src, "dst": args.dst, "written": written,
                     "timings": {"total_s": seconds}})
    else:
        for path in written:
            print(path)
        _note(args, f"converted {args.src} -> {args.dst} in {seconds:.1f}s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start :mod:`kandinsky.server` (needs FastAPI and uvicorn: ``pip install 'kandinsky[server]'``)."""
    import importlib.util

    for package in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(package) is None:
            raise CLIError(f"kandinsky serve needs the '{package}' package; pip install 'kandinsky[server]'")
    server = _optional_module("kandinsky.server", "kandinsky serve: the HTTP server")
    run = getattr(server, "main", None)
    if run is None:
        raise CLIError("kandinsky serve: kandinsky.server has no main() entry point")
    return int(run(args) or 0)


# ================================================================================================ entry point


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing {text}"
    return " ".join(text.split())


def _fail(message: str, code: int, as_json: bool) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if as_json:
        _print_json({"ok": False, "error": message, "exit_code": code})
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 1 unexpected failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, as_json = "--debug" in argv, "--json" in argv
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore")
        return _main(argv, debug, as_json)


def _main(argv: list[str], debug: bool, as_json: bool) -> int:
    try:
        parser = build_parser(argv)
        args, extra = parser.parse_known_args(argv)
        if extra:
            where = f"{PROG} {args.command}" if getattr(args, "command", None) else PROG
            raise CLIError(f"unrecognized arguments: {' '.join(extra)} (see `{where} --help`)")
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_ERROR
        return int(args.func(args) or 0)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_ERROR)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kandinsky info IMAGE | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CRASH
    except (CLIError, ValueError, OSError, argparse.ArgumentError) as exc:
        if debug:
            traceback.print_exc()
        return _fail(_one_line(exc), EXIT_ERROR, as_json)
    except Exception as exc:  # noqa: BLE001 - the one place that turns crashes into an exit status
        if debug:
            traceback.print_exc()
            return _fail(f"unexpected {type(exc).__name__}: {_one_line(exc)}", EXIT_CRASH, as_json)
        return _fail(f"unexpected {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)",
                     EXIT_CRASH, as_json)
