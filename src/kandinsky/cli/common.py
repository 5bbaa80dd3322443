"""What every part of the command line shares: the program name, exit codes, the usage error and console output
(notes and progress on stderr, results on stdout, ``--json`` objects)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

PROG = "kandinsky"
EXIT_ERROR, EXIT_CRASH, EXIT_INTERRUPTED = 2, 1, 130


class CLIError(Exception):
    """A usage or input error: printed as one line, exit status 2."""


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars: unless ``--quiet``, and only on a terminal."""
    return not args.quiet and sys.stderr.isatty()


def write(message: str, file: Any) -> None:
    """A line that does not break a progress bar (characters the console cannot show are written as escapes)."""
    encoding = getattr(file, "encoding", None) or "utf-8"
    try:
        message.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        message = message.encode("ascii", "backslashreplace").decode("ascii")
    try:
        from tqdm import tqdm

        tqdm.write(message, file=file)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(message, file=file)


def note(args: argparse.Namespace, message: str) -> None:
    """A ``kandinsky: ...`` note on stderr (not with ``--quiet``)."""
    if not getattr(args, "quiet", False):
        write(f"{PROG}: {message}", sys.stderr)


def emit(args: argparse.Namespace, message: str) -> None:
    """A result line on stdout (not with --json, where the JSON object is the result)."""
    if not args.json:
        write(message, sys.stdout)


def print_json(obj: dict[str, Any]) -> None:
    """The ``--json`` result object (non-ASCII text as it is, unless the output cannot encode it: lone surrogates
    of undecodable file names, a console in another encoding; then as ``\\u`` escapes, which read back the same)."""
    text = json.dumps(obj, ensure_ascii=False, indent=2, default=str)
    try:
        text.encode(getattr(sys.stdout, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        text = json.dumps(obj, ensure_ascii=True, indent=2, default=str)
    print(text)


def bar(args: argparse.Namespace, total: int, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr (disabled when progress is not shown)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not show_progress(args), dynamic_ncols=True,
                file=sys.stderr)


def one_line(exc: BaseException) -> str:
    """An exception as one line of printable text (line breaks become spaces, other control characters such as
    NUL or ESC are shown as escapes, so that a file name cannot break the line or drive the terminal)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing {text}"
    return printable(" ".join(text.split()))


def printable(text: str) -> str:
    """``text`` with control characters (C0, DEL, C1, line and paragraph separators) as ``\\xNN``/``\\uNNNN``."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
