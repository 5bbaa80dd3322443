"""The commands: ``generate``/``mix``/``img2img``/``inpaint``/``variations`` (single runs, ``--from`` re-runs,
``--prompts`` batches), ``info``, ``convert`` and ``serve``."""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import Any

from .. import metadata
from ..jobs import COMMAND_MODE, MODE_KEYS, NEEDS, Job, load_pipeline, new_seed, optional_module, run
from .batch import run_batch
from .common import CLIError, emit, note, print_json, show_progress
from .morph import morph_from
from .options import job_options, model_choice
from .outputs import Outputs, job_slug


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
            return morph_from(args, record, start)
        if mode not in MODE_KEYS:
            raise ValueError(f"{args.from_image} records an unknown mode {mode!r}")
        given = job_options(args, "txt2img")
        base = {**{k: v for k, v in record.items() if k in MODE_KEYS[mode]},
                **{k: v for k, v in given.items() if k in MODE_KEYS[mode]}}
        if "num" not in given and record.get("index") is not None:
            index = int(record["index"])
        base["num"] = base.get("num") or 1
    else:
        base = job_options(args, mode)
    choice = model_choice(args, record)
    prompts_file = getattr(args, "prompts", None)
    if prompts_file:
        return run_batch(args, mode, base, Path(prompts_file), choice, start)

    job = Job.from_dict(base, mode).validate()
    num = job.num or 1
    if index is not None and index >= num:
        raise ValueError(f"the recorded batch position {index} is outside the batch of {num}")
    outputs = Outputs(args.out, args.overwrite)
    if job.seed is None:
        job.seed = new_seed()
    paths = outputs.names(1 if index is not None else num, job.seed, job_slug(job))

    t0 = time.perf_counter()
    pipe, model = load_pipeline(choice, NEEDS[mode])
    pipe.set_progress(show_progress(args))
    t1 = time.perf_counter()
    note(args, f"seed {job.seed}")
    made = run(pipe, job, model=model)
    t2 = time.perf_counter()
    picks = [index] if index is not None else list(range(len(made)))
    results = []
    for path, i in zip(paths, picks, strict=True):
        img, rec = made[i]
        metadata.save_image(img, path, rec, overwrite=args.overwrite)
        results.append({"path": str(path), "seed": rec["seed"], "index": i, "parameters": rec})
        where = f", image {i + 1} of {num}" if num > 1 else ""
        emit(args, f"{path}  (seed {rec['seed']}{where})")
    timings = {"load_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3),
               "total_s": round(time.perf_counter() - start, 3)}
    if args.json:
        print_json({"ok": True, "command": args.command, "mode": mode, "seed": job.seed, "images": results,
                    "timings": timings})
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """An image's parameters (A1111 text), a model folder's components, or (``--system``) the machine."""
    if getattr(args, "system", False):
        from .. import system

        if args.path is not None:
            raise CLIError("--system takes no PATH")
        report = system.report()
        print_json(report) if args.json else print(system.format_report(report))
        return 0
    if args.path is None:
        from ..pipeline import ASSETS

        if not any((ASSETS / r).is_dir() for r in ("decoder", "prior", "inpaint")):
            raise FileNotFoundError(f"no bundled model in {ASSETS}; pass a model folder or an image")
        target = ASSETS
    else:
        target = Path(args.path)
    if target.is_dir():
        info = metadata.describe_model(target)
        if args.json:
            print_json(info)
        else:
            print(metadata.format_model_info(info))
        return 0
    meta = metadata.read_metadata(target)
    if meta["parameters"] is None and meta["record"] is None:
        raise ValueError(f"{target} carries no generation parameters")
    if args.json:
        print_json({"path": str(target), **meta})
    else:
        print(meta["parameters"] if meta["parameters"] is not None else metadata.build_parameters(meta["record"]))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert weights with :func:`kandinsky.weights.convert.convert`."""
    module = optional_module("kandinsky.weights.convert", "kandinsky convert (weight conversion)")
    kwargs: dict[str, Any] = {"progress": show_progress(args), "overwrite": args.overwrite}
    for key in ("to", "dtype", "clip_tokenizer"):
        if getattr(args, key, None):
            kwargs[key] = getattr(args, key)
    start = time.perf_counter()
    written = module.convert(args.src, args.dst, **kwargs)
    written = [str(p) for p in written] if isinstance(written, list | tuple) else [str(written or args.dst)]
    seconds = round(time.perf_counter() - start, 3)
    if args.json:
        print_json({"ok": True, "command": "convert", "src": args.src, "dst": args.dst, "written": written,
                    "timings": {"total_s": seconds}})
    else:
        for path in written:
            print(path)
        note(args, f"converted {args.src} -> {args.dst} in {seconds:.1f}s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start :mod:`kandinsky.server` (needs FastAPI and uvicorn: ``pip install 'kandinsky[server]'``)."""
    for package in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(package) is None:
            raise CLIError(f"kandinsky serve needs the '{package}' package; pip install 'kandinsky[server]'")
    server = optional_module("kandinsky.server", "kandinsky serve: the HTTP server")
    serve = getattr(server, "main", None)
    if serve is None:
        raise CLIError("kandinsky serve: kandinsky.server has no main() entry point")
    return int(serve(args) or 0)


def cmd_download(args: argparse.Namespace) -> int:
    """Fetch the official repositories into the Hugging Face cache and print where they are."""
    from ..weights import hub

    roles = ("decoder", "prior", "inpaint") if args.what == "all" else (args.what,)
    where: dict[str, str] = {}
    if args.what == "original":  # the release's files, OpenAI's CLIP and the CLIP tokenizer
        from ..weights import original_hub

        note(args, f"original: {original_hub.ORIGINAL_REPO}" + (f"@{args.revision}" if args.revision else ""))
        where = {k: str(v) for k, v in original_hub.download(args.revision, progress=show_progress(args)).items()}
        roles = ()
        if not args.json:
            for key, path in where.items():
                print(f"{key}: {path}")
    for role in roles:
        spec = hub.REPOS[role] + (f"@{args.revision}" if args.revision else "")
        note(args, f"{role}: {spec}")
        where[role] = str(hub.resolve(spec, progress=show_progress(args), refresh=True))
        if not args.json:
            print(f"{role}: {where[role]}")
    if args.json:
        print_json({"ok": True, "command": "download", "folders": where})
    return 0
