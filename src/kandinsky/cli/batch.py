"""``--prompts FILE``: one job a line (a prompt, options, or a JSON object), resumable: finished lines are skipped."""

from __future__ import annotations

import argparse
import errno
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from .. import metadata
from ..jobs import NEEDS, Job, JobError, ModelChoice, canonical_keys, load_pipeline, new_seed, run
from .common import EXIT_CRASH, EXIT_ERROR, PROG, CLIError, bar, emit, note, one_line, print_json, show_progress, write
from .outputs import IMAGE_SUFFIXES, Outputs, job_slug
from .parser import line_parser


def read_prompts(path: Path, mode: str) -> list[tuple[int, dict[str, Any] | Exception]]:
    """Jobs of a ``--prompts`` file: (line number, the line's job fields or the error that line has).

    A line is a prompt, options (``--seed 3 --steps 20 "a red cat"``) or a JSON object (``{"prompt": ..., "seed": 3}``).
    Blank lines and ``#`` comments are skipped. Lines end at ``\\n`` (``\\r\\n`` too), as editors count them; a
    line that is not UTF-8 is that line's error, not the file's. Field names are checked when the line becomes a
    :class:`Job`.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"prompts file not found: {path}") from None
    except IsADirectoryError:
        raise CLIError(f"prompts file {path} is a folder") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"prompts file {path} is UTF-16 text; save it as UTF-8")
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
        data = data[3:]
    jobs: list[tuple[int, dict[str, Any] | Exception]] = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            try:
                line = raw.removesuffix(b"\r").decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise ValueError(f"the line is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                 f"{exc.start + 1})") from None
            if not line or line.startswith("#"):
                continue
            jobs.append((number, parse_line(line, mode)))
        except (ValueError, CLIError) as exc:
            jobs.append((number, exc))
    return jobs


def parse_line(line: str, mode: str) -> dict[str, Any]:
    """The job fields of one ``--prompts`` line (ValueError or :class:`CLIError` if it cannot be read)."""
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:
            raise ValueError("invalid JSON: nested too deeply") from None
        except ValueError as exc:  # a number too long to read
            raise ValueError(f"invalid JSON: {str(exc)[:100]}") from None
        if not isinstance(obj, dict):
            raise ValueError("a JSON line must be an object")
        job = canonical_keys(obj)
    elif line.startswith("-"):
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise ValueError(f"cannot split the options: {exc}") from None
        ns = line_parser(mode).parse_args(words)
        job = {k: v for k, v in vars(ns).items() if v is not None and k not in ("prompt_pos", "fast")}
        if ns.prompt_pos is not None:
            job["prompt"] = ns.prompt_pos
    else:
        job = {"prompt": line}
    for key in ("image", "mask"):
        value = job.get(key)
        if isinstance(value, str) and value:
            if "\0" in value:
                raise JobError(key, f"the {key} path contains a NUL character")
            job[key] = str(Path(value).resolve())
    return job


def run_batch(args: argparse.Namespace, mode: str, base: dict[str, Any], path: Path, choice: ModelChoice,
              start: float) -> int:
    """Run every line of a prompts file; bad lines are reported and skipped, done outputs are not redone.

    Lines override the command line's options (a prompt given there is the default of lines without one). Output
    names come from the line number and prompt (``00003-a-red-cat.png``), so a re-run skips finished lines: files
    that are complete (:func:`metadata.is_complete`; every image is written whole, then renamed into place, so a
    killed run leaves none half-written) and made again when not. A failure to write (a full disk) stops the batch.
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
    crashed = False

    def fail(number: int, exc: BaseException, unexpected: bool = False) -> None:
        message = one_line(exc)
        if unexpected:
            message = f"unexpected {type(exc).__name__}: {message}"
        errors.append({"line": number, "error": message})
        write(f"{PROG}: error: {path}:{number}: {message}", sys.stderr)

    todo: list[tuple[int, Job, list[Path]]] = []
    for number, parsed in lines:
        try:
            if isinstance(parsed, Exception):
                raise parsed
            job = Job.from_dict({**base, **parsed}, mode).validate()
            num, name = job.num or 1, job_slug(job)
            paths = [outputs.folder / (f"{number:05d}-{name}.png" if num == 1 else f"{number:05d}-{k + 1}-{name}.png")
                     for k in range(num)]
        except (CLIError, ValueError, OSError) as exc:
            fail(number, exc)
            continue
        if not args.overwrite and all(metadata.is_complete(p) for p in paths):
            skipped.append({"line": number, "paths": [str(p) for p in paths]})
            note(args, f"{path}:{number}: done already, skipped ({paths[0].name})")
        else:
            todo.append((number, job, paths))

    load_s = 0.0
    if todo:  # a model that cannot load stops the batch: that is not one line's fault
        t0 = time.perf_counter()
        pipe, model = load_pipeline(choice, NEEDS[mode])
        pipe.set_progress(show_progress(args))
        load_s = time.perf_counter() - t0
    progress = bar(args, len(todo), "batch", "job")
    try:
        for number, job, paths in todo:
            try:
                if job.seed is None:
                    job.seed = new_seed()
                t0 = time.perf_counter()
                made = run(pipe, job, model=model)
                seconds = round(time.perf_counter() - t0, 3)
            except (CLIError, ValueError, OSError) as exc:
                fail(number, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one line's crash (out of memory ...) does not stop the rest
                fail(number, exc, unexpected=True)
                crashed = True
                continue
            finally:
                progress.update(1)
            for i, ((img, rec), p) in enumerate(zip(made, paths, strict=True)):
                replace = args.overwrite
                if p.exists() and not args.overwrite:
                    if metadata.is_complete(p):
                        continue  # kept from an interrupted run
                    note(args, f"{path}:{number}: {p.name} is incomplete; writing it again")
                    replace = True
                try:
                    metadata.save_image(img, p, rec, overwrite=replace)
                except FileExistsError as exc:  # made meanwhile by another run: that line's problem only
                    fail(number, exc)
                    break
                except OSError as exc:  # a full disk, a folder turned read-only: every further write would fail
                    raise CLIError(_write_failure(exc, outputs.folder, number, len(done))) from exc
                done.append({"line": number, "path": str(p), "seed": rec["seed"], "index": i, "seconds": seconds,
                             "parameters": rec})
                emit(args, f"{p}  (line {number}, seed {rec['seed']})")
    finally:
        progress.close()
    note(args, f"batch: {len(done)} image(s) written, {len(skipped)} job(s) skipped, {len(errors)} failed")
    if args.json:
        print_json({"ok": not errors, "command": args.command, "mode": mode, "prompts": str(path), "images": done,
                    "skipped": skipped, "errors": errors,
                    "timings": {"load_s": round(load_s, 3), "total_s": round(time.perf_counter() - start, 3)}})
    return EXIT_CRASH if crashed else EXIT_ERROR if errors else 0


def _write_failure(exc: OSError, folder: Path, number: int, written: int) -> str:
    """The one line that stops a batch whose output cannot be written."""
    full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if full:
        why = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    else:
        why = exc.strerror or str(exc)
    return (f"{why}: cannot write to {folder} (line {number}); batch stopped after {written} image(s) written, "
            f"nothing partial left; {'make room' if full else 'fix that'} and run the same command again to finish")
