"""``kandinsky morph`` (an animation between key frames) and ``generate --from`` of one morph frame."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .. import metadata
from ..jobs import MODE_KEYS, NEEDS, Job, load_pipeline, make_record, new_seed, run
from .common import bar, emit, note, print_json, show_progress
from .options import job_options, model_choice
from .outputs import Outputs, job_slug, morph_outputs, save_animation


def cmd_morph(args: argparse.Namespace) -> int:
    """A smooth sequence between key frames: interpolate their image embeddings, decode with fixed noise."""
    start = time.perf_counter()
    options = job_options(args, "morph")
    options.setdefault("frames", 16)
    options.setdefault("interp", "slerp")
    job = Job.from_dict(options, "morph").validate()
    if job.seed is None:
        job.seed = new_seed()
    anim, frames_dir = morph_outputs(args, job)
    t0 = time.perf_counter()
    pipe, model = load_pipeline(model_choice(args), NEEDS["morph"])
    pipe.set_progress(show_progress(args))
    t1 = time.perf_counter()
    note(args, f"seed {job.seed}")
    frame_bar = bar(args, job.frames or 16, "frames", "frame")
    made = run(pipe, job, lambda done, total: frame_bar.update(1), model=model)
    frame_bar.close()
    t2 = time.perf_counter()
    results = []
    for img, rec in made:
        if frames_dir is not None:
            i = rec["frame"]
            path = metadata.save_image(img, frames_dir / f"frame-{i + 1:03d}.png", rec, overwrite=args.overwrite)
            results.append({"path": str(path), "frame": i, "seed": rec["seed"]})
    save_animation([out.image for out in made], anim, args.fps, args.boomerang, args.overwrite)
    emit(args, f"{anim}  (seed {job.seed}, {job.frames} frames"
               + (f" in {frames_dir})" if frames_dir is not None else ")"))
    if args.json:
        rec = make_record(job, made[0].image.info.get("kandinsky", {}), model)
        print_json({"ok": True, "command": "morph", "seed": job.seed, "animation": str(anim),
                    "frames": results, "parameters": rec,
                    "timings": {"load_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3),
                                "total_s": round(time.perf_counter() - start, 3)}})
    return 0


def morph_from(args: argparse.Namespace, record: dict[str, Any], start: float) -> int:
    """``generate --from FRAME.png`` of a morph frame: re-decode that one frame."""
    given = job_options(args, "txt2img")
    job = Job.from_dict({**record, **{k: v for k, v in given.items() if k in MODE_KEYS["morph"]}}, "morph",
                        strict=False).validate()
    if job.seed is None:
        job.seed = new_seed()
    frame = int(record.get("frame") or 0)
    outputs = Outputs(args.out, args.overwrite)
    path = outputs.names(1, job.seed, job_slug(job))[0]
    t0 = time.perf_counter()
    pipe, model = load_pipeline(model_choice(args, record), NEEDS["morph"])
    pipe.set_progress(show_progress(args))
    t1 = time.perf_counter()
    [(img, rec)] = run(pipe, job, model=model, frames=[frame])
    metadata.save_image(img, path, rec, overwrite=args.overwrite)
    emit(args, f"{path}  (seed {rec['seed']}, morph frame {rec['frame'] + 1} of {job.frames})")
    if args.json:
        print_json({"ok": True, "command": args.command, "mode": "morph", "seed": rec["seed"],
                    "images": [{"path": str(path), "seed": rec["seed"], "frame": rec["frame"], "parameters": rec}],
                    "timings": {"load_s": round(t1 - t0, 3), "generate_s": round(time.perf_counter() - t1, 3),
                                "total_s": round(time.perf_counter() - start, 3)}})
    return 0
