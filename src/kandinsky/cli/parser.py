"""The ``kandinsky`` argument parser: flag types, the option groups the commands share, the parser of one
``--prompts`` line, and :func:`build_parser`, which wires each command to its handler."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..jobs import INTERPOLATIONS, SAMPLER_CHOICES, add_model_arguments, optional_module
from ..server.config import add_serve_arguments
from .common import PROG, CLIError

Handler = Callable[[argparse.Namespace], int]
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


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors raised as :class:`CLIError` instead of usage + exit."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise CLIError(f"{message} (see `{self.prog} --help`)" if self.add_help else message)


# ================================================================================================ argument types


def int_type(name: str, minimum: int, multiple: int = 1) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (and a multiple of ``multiple``)."""
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


def float_type(name: str, low: float = 0.0, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (or (low, high])."""
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


# ================================================================================================ option groups


def output_flags(p: argparse.ArgumentParser) -> None:
    """``--quiet``, ``--json``, ``--debug``."""
    g = p.add_argument_group("output control")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes (results still print)")
    g.add_argument("--json", action="store_true", help="print one JSON object: paths, seeds, parameters, timings")
    g.add_argument("--debug", action="store_true", help="show the traceback of errors")


def gen_flags(p: argparse.ArgumentParser, *, prior: bool = True, num: bool = True, out: bool = True,
              out_help: str = "", prompt_help: str = "the prompt") -> None:
    """The generation options (their dests are the job's field names)."""
    g = p.add_argument_group("generation (defaults: the model folder's recorded ones, else the published ones)")
    g.add_argument("-p", "--prompt", help=prompt_help)
    g.add_argument("-n", "--negative", metavar="TEXT", help="negative prompt")
    g.add_argument("-W", "--width", metavar="W", type=int_type("width", 8, 8), help="width, a multiple of 8 (512)")
    g.add_argument("-H", "--height", metavar="H", type=int_type("height", 8, 8), help="height, a multiple of 8 (512)")
    g.add_argument("--steps", metavar="N", type=int_type("steps", 1), help="decoder steps (100)")
    g.add_argument("--guidance", "--cfg-scale", metavar="X", type=float_type("guidance"),
                   help="decoder CFG scale (4)")
    if prior:
        g.add_argument("--prior-steps", metavar="N", type=int_type("prior steps", 1), help="prior steps (25)")
        g.add_argument("--prior-guidance", metavar="X", type=float_type("prior guidance"),
                       help="prior CFG scale (4)")
    g.add_argument("--sampler", choices=SAMPLER_CHOICES, help="decoder sampler (ddim)")
    g.add_argument("--fast", action="store_true",
                   help="the fast preset for unset options (kandinsky.pipeline.PRESETS['fast'], docs/benchmarks.md)")
    g.add_argument("-s", "--seed", metavar="S", type=int_type("seed", 0),
                   help="random seed (random when absent; always printed)")
    g.add_argument("--lora", dest="loras", action="append", metavar="PATH[:SCALE]",
                   help="apply a LoRA adapter (a peft folder or a .safetensors file) with a scale (1); repeatable, "
                        "the adapters mix")
    if num:
        g.add_argument("--num", metavar="N", type=int_type("num", 1),
                       help="images per prompt, drawn from one generator (1)")
    if out:
        g.add_argument("-o", "--out", metavar="PATH",
                       help=out_help or "output file (.png/.jpg/.webp) or folder (default: outputs/)")
        g.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def line_parser(mode: str) -> Parser:
    """The parser of one ``--prompts`` line written as options (``--seed 3 --steps 20 "a red cat"``)."""
    p = Parser(prog="prompts line", add_help=False)
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT")
    gen_flags(p, prior=mode != "variations", out=False)
    if mode in ("img2img", "inpaint", "variations"):
        p.add_argument("-i", "--image")
    if mode == "img2img":
        p.add_argument("--strength", type=float_type("strength", 0.0, 1.0))
    if mode == "inpaint":
        p.add_argument("-m", "--mask")
    return p


# ================================================================================================ the parser


def build_parser(handlers: Mapping[str, Handler], argv: Sequence[str] = (),
                 extra: Sequence[Callable[[Callable[..., Parser]], None]] = ()) -> Parser:
    """The full ``kandinsky`` parser; ``handlers`` maps each command to its function (``args.func``).
    ``argv`` decides whether ``train``/``finetune`` are imported; each of ``extra`` adds commands through the
    ``command(name, help, func)`` it is given."""
    from .. import __version__

    parser = Parser(prog=PROG, description="Kandinsky 2.1 text-to-image: generate, mix, edit and morph images.",
                    epilog="Run `kandinsky COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)

    def command(name: str, help_text: str, func: Handler | None = None) -> Parser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func or handlers[name], command=name)
        return p

    p = command("generate", "text-to-image")
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or --prompt)")
    p.add_argument("--from", dest="from_image", metavar="IMAGE",
                   help="re-run the parameters recorded in IMAGE, any mode (the same image, bit for bit, on the "
                        "same model, device and dtype); options given here override them")
    p.add_argument("--prompts", metavar="FILE", help="batch: one job a line (text or JSONL); re-runs skip done jobs")
    gen_flags(p)
    add_model_arguments(p, speed=True)
    output_flags(p)

    p = command("mix", "mix prompts and images in CLIP space (--text/--image, any number, PROMPT[:WEIGHT])")
    p.add_argument("-t", "--text", dest="items", action=ItemAction, const="text", metavar="PROMPT[:WEIGHT]",
                   help="a prompt to mix; the weight is the number after the last colon (default 1)")
    p.add_argument("-i", "--image", dest="items", action=ItemAction, const="image", metavar="PATH[:WEIGHT]",
                   help="an image to mix")
    p.add_argument("--raw-weights", action="store_true",
                   help="use the weights as given (default: divide them by their sum)")
    gen_flags(p, prompt_help="the decoder's text prompt (default: empty)")
    add_model_arguments(p, speed=True)
    output_flags(p)

    for name, help_text in (("img2img", "redraw an image towards a prompt"),
                            ("inpaint", "repaint the white part of a mask"),
                            ("variations", "new images from one image's CLIP embedding")):
        p = command(name, help_text)
        p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or --prompt)")
        p.add_argument("-i", "--image", metavar="PATH", help="the input image")
        if name == "img2img":
            p.add_argument("--strength", type=float_type("strength", 0.0, 1.0),
                           help="fraction of the trajectory re-drawn, in (0, 1] (default 0.3); with --compat "
                                "original the fraction kept, in [0, 1) (default 0.7)")
        if name == "inpaint":
            p.add_argument("-m", "--mask", metavar="PATH", help="the mask: white = repaint, same size as the image")
        if name != "variations":
            p.add_argument("--prompts", metavar="FILE", help="batch: one job a line (text or JSONL)")
        gen_flags(p, prior=name != "variations",
                  prompt_help="the decoder's text prompt (default: empty)" if name == "variations" else "the prompt")
        add_model_arguments(p, speed=True)
        output_flags(p)

    p = command("morph", "an animation between prompts/images (interpolated image embeddings, fixed noise)")
    p.add_argument("-t", "--text", dest="items", action=ItemAction, const="text", metavar="PROMPT",
                   help="a key frame prompt (in order; two or more key frames in all)")
    p.add_argument("-i", "--image", dest="items", action=ItemAction, const="image", metavar="PATH",
                   help="a key frame image")
    p.add_argument("--frames", type=int_type("frames", 2), help="frames in all, key frames included (default 16)")
    p.add_argument("--interp", choices=INTERPOLATIONS,
                   help="slerp (default: spherical on directions, linear on norms) or lerp")
    p.add_argument("--fps", type=float_type("fps", 0.0, 100.0, low_open=True), default=8.0,
                   help="frames per second (default 8)")
    p.add_argument("--format", choices=("gif", "webp"), help="animation format when --out is a folder (default gif)")
    p.add_argument("--boomerang", action="store_true", help="play forwards then backwards")
    p.add_argument("--no-frames", action="store_true", help="write only the animation, not the frame PNGs")
    gen_flags(p, num=False, prompt_help="the decoder's text prompt for every frame (default: empty)",
              out_help="animation file (.gif/.webp; frames go to NAME-frames/) or folder (default: outputs/)")
    add_model_arguments(p, speed=True)
    output_flags(p)

    p = command("convert", "convert model weights (original checkpoints, diffusers folders, safetensors)")
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
    output_flags(p)

    p = command("info", "print an image's generation parameters, or a model folder's components")
    p.add_argument("path", nargs="?", metavar="PATH", help="an image, or a model folder (default: the bundled model)")
    p.add_argument("--system", action="store_true",
                   help="print this machine's CPU, torch build and which fast paths are used (for bug reports)")
    output_flags(p)

    p = command("download", "fetch the published weights from the Hugging Face Hub into its cache (or, offline, "
                            "say where the cached ones are)")
    p.add_argument("what", nargs="?", choices=("all", "decoder", "prior", "inpaint", "original"), default="all",
                   help="all (default): the three diffusers-format repositories kandinsky-community/kandinsky-2-1"
                        "[-prior|-inpaint], or one of them; original: the original release's files from "
                        "ai-forever/Kandinsky_2.1 (both UNets, prior, MoVQ, M-CLIP: several GB) with OpenAI's CLIP "
                        "ViT-L/14 (from OpenAI's URL, checksum-verified, into ~/.cache/kandinsky or "
                        "$KANDINSKY_CACHE) and its tokenizer (openai/clip-vit-large-patch14), for --original")
    p.add_argument("--revision", metavar="R", help="a branch, tag or commit (default: main)")
    output_flags(p)

    p = command("serve", "run the HTTP server and web page (the /v1 API, A1111's /sdapi/v1 subset, a page at /)")
    add_serve_arguments(p)
    add_model_arguments(p)
    output_flags(p)

    for add in extra:  # commands whose modules build on this one (kandinsky ray)
        add(command)
    _add_train(sub, command, argv)
    return parser


def _add_train(sub: Any, command: Callable[..., Parser], argv: Sequence[str]) -> None:
    """``train``/``finetune`` come from :mod:`kandinsky.train.cli`; imported only when they are asked for."""
    wanted = next((a for a in argv if not a.startswith("-")), None)
    if wanted in ("train", "finetune"):
        module = optional_module("kandinsky.train.cli", f"kandinsky {wanted}", required=False)
        if module is not None:
            module.add_train_parsers(sub)
            return
    for name, help_text in (("train", "train the small bundled-style model (a stage or all)"),
                            ("finetune", "fine-tune a decoder or prior folder on image-caption pairs")):
        p = command(name, help_text, _missing_train)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _missing_train(args: argparse.Namespace) -> int:
    raise CLIError(f"kandinsky {args.command}: training is not installed in this version")
