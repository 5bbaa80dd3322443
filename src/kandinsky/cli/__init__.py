"""The ``kandinsky`` command line (``python -m kandinsky`` is the same).

Subcommands: ``generate`` (text-to-image), ``mix``, ``img2img``, ``inpaint``, ``variations``, ``morph``,
``convert``, ``info``, ``serve``, ``train`` and ``finetune``. Every image is written with its parameters in the
AUTOMATIC1111 ``parameters`` format (see :mod:`kandinsky.metadata`); ``generate --from IMAGE`` re-runs them.
The jobs themselves are :mod:`kandinsky.jobs`'; this package turns options into jobs and results into files.

Errors print one line ``kandinsky: error: ...`` and exit with status 2; unexpected failures exit with 1 and show
their traceback only with ``--debug``; Ctrl+C prints ``kandinsky: interrupted`` and exits with 130. Images are
written whole or not at all (a temporary file, then a rename), so an interrupted or killed run leaves no partial
file, and a ``--prompts`` batch run again finishes what is missing. A batch stops at the first output it cannot
write (a full disk: ``no space left on device: cannot write to FOLDER ...``, status 2).

Modules: :mod:`.parser` (argparse), :mod:`.options` (options -> jobs), :mod:`.commands`, :mod:`.batch`
(``--prompts``), :mod:`.morph`, :mod:`.outputs` (file naming), :mod:`.common` (errors, console output).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from ..jobs import Unavailable
from . import parser as _parser
from .commands import cmd_convert, cmd_download, cmd_images, cmd_info, cmd_serve
from .common import EXIT_CRASH, EXIT_ERROR, EXIT_INTERRUPTED, PROG, CLIError, one_line, print_json
from .morph import cmd_morph
from .ray import add_ray_parsers, cmd_ray  # Ray itself is imported only when a command runs

__all__ = ["CLIError", "HANDLERS", "build_parser", "main"]

HANDLERS: dict[str, _parser.Handler] = {
    "generate": cmd_images, "mix": cmd_images, "img2img": cmd_images, "inpaint": cmd_images,
    "variations": cmd_images, "morph": cmd_morph, "convert": cmd_convert, "info": cmd_info, "serve": cmd_serve,
    "download": cmd_download,
}


def _add_ray(command: Callable[..., _parser.Parser]) -> None:
    add_ray_parsers(command("ray", "serve and batch on a Ray cluster: serve, status, batch (kandinsky[ray])", cmd_ray))


def build_parser(argv: Sequence[str] = ()) -> _parser.Parser:
    """The full ``kandinsky`` parser. ``argv`` decides whether ``train``/``finetune`` are imported."""
    return _parser.build_parser(HANDLERS, argv, extra=(_add_ray,))


def _fail(message: str, code: int, as_json: bool) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if as_json:
        print_json({"ok": False, "error": message, "exit_code": code})
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
    except KeyboardInterrupt:  # Ctrl+C: outputs are written whole or not at all, so nothing is left half-written
        print(f"{PROG}: interrupted", file=sys.stderr)
        if as_json:
            print_json({"ok": False, "error": "interrupted", "exit_code": EXIT_INTERRUPTED})
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `kandinsky info IMAGE | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CRASH
    except (CLIError, Unavailable, ValueError, OSError, argparse.ArgumentError) as exc:  # JobError is a ValueError
        if debug:
            traceback.print_exc()
        return _fail(one_line(exc), EXIT_ERROR, as_json)
    except Exception as exc:  # noqa: BLE001 - the one place that turns crashes into an exit status
        if debug:
            traceback.print_exc()
            return _fail(f"unexpected {type(exc).__name__}: {one_line(exc)}", EXIT_CRASH, as_json)
        return _fail(f"unexpected {type(exc).__name__}: {one_line(exc)} (run with --debug for the traceback)",
                     EXIT_CRASH, as_json)
