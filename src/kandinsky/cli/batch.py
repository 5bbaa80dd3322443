"""``--prompts FILE``: one job a line (a prompt, options, or a JSON object), resumable: finished lines are skipped."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from .. import metadata
from ..jobs import NEEDS, Job, ModelChoice, canonical_keys, load_pipeline, new_seed, run
from .common import EXIT_ERROR, PROG, CLIError, bar, emit, note, one_line, print_json, show_progress, write
from .outputs import IMAGE_SUFFIXES, Outputs, job_slug
from .parser import line_parser


def read_prompts(path: Path, mode: str) -> list[tuple[int, dict[str, Any] | Exception]]:
    """Jobs of a ``--prompts`` file: (line number, the line's job fields or the error that line has).

    A line is a prompt, options (``--seed 3 --steps 20 "a cat"``) or a JSON object (``{"prompt": ..., "seed": 3}``).
    Blank lines and ``#`` comments are skipped. Field names are checked when the line becomes a :class:`Job`.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompts file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompts file {path} is not UTF-8 text: {exc}") from None
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
                if isinstance(job.get(key), str):
                    job[key] = str(Path(job[key]).resolve())
            jobs.append((number, job))
        except (ValueError, CLIError) as exc:
            jobs.append((number, exc))
    return jobs


def run_batch(args: argparse.Namespace, mode: str, base: dict[str, Any], path: Path, choice: ModelChoice,
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
        message = one_line(exc)
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
        if not args.overwrite and all(p.exists() for p in paths):
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
    for number, job, paths in todo:
        try:
            if job.seed is None:
                job.seed = new_seed()
            t0 = time.perf_counter()
            made = run(pipe, job, model=model)
            seconds = round(time.perf_counter() - t0, 3)
            for i, ((img, rec), p) in enumerate(zip(made, paths, strict=True)):
                if p.exists() and not args.overwrite:
                    continue  # kept from an interrupted run
                metadata.save_image(img, p, rec, overwrite=args.overwrite)
                done.append({"line": number, "path": str(p), "seed": rec["seed"], "index": i, "seconds": seconds,
                             "parameters": rec})
                emit(args, f"{p}  (line {number}, seed {rec['seed']})")
        except (CLIError, ValueError, OSError) as exc:
            fail(number, exc)
        finally:
            progress.update(1)
    progress.close()
    note(args, f"batch: {len(done)} image(s) written, {len(skipped)} job(s) skipped, {len(errors)} failed")
    if args.json:
        print_json({"ok": not errors, "command": args.command, "mode": mode, "prompts": str(path), "images": done,
                    "skipped": skipped, "errors": errors,
                    "timings": {"load_s": round(load_s, 3), "total_s": round(time.perf_counter() - start, 3)}})
    return EXIT_ERROR if errors else 0
