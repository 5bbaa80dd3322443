"""Peak resident memory and step time of the decoder alone (text encoder, UNet, MoVQ), ours against diffusers.

Each run is its own process (so that its peak RSS is its own): load the decoder folder, one ``text_to_image``
call with given image embeddings (no prior), ``--steps`` DDIM steps at ``--size``. ``compare`` alternates the
implementations and prints the medians and the ratios ours/diffusers, with the load average. The published
architecture with random weights comes from ``python bench/e2e.py make --out /tmp/k21``.

    python bench/memory.py compare --model /tmp/k21/decoder --size 256 --steps 3 --repeats 2
    python bench/memory.py compare --model /tmp/k21/decoder --ours= --ours="--precision auto" --ours=--low-memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 768, generator=g), torch.randn(1, 768, generator=g)
    stamps: list[float] = []
    cpu_stamps: list[float] = []

    def stamp(*_: object) -> None:
        stamps.append(time.time())
        cpu_stamps.append(time.process_time())

    t0 = time.time()
    if args.impl == "ours":
        from kandinsky import Kandinsky21

        extra = {"precision": args.precision} if args.precision != "fp32" else {}  # older versions: no precision
        pipe = Kandinsky21.from_pretrained(decoder=args.model, low_memory=args.low_memory, **extra)
        load_s = time.time() - t0
        pipe.set_progress(stamp)
        t1 = time.time()
        pipe.text_to_image("a red cat on a blue sofa", image_embeds=embeds, negative_image_embeds=negative,
                           width=args.size, height=args.size, steps=args.steps, sampler="ddim", seed=0, output="np")
        settings = {"precision": args.precision, "dtype": str(pipe.dtype).removeprefix("torch."),
                    "low_memory": args.low_memory}
    else:
        from diffusers import KandinskyPipeline

        pipe = KandinskyPipeline.from_pretrained(str(args.model))
        pipe.set_progress_bar_config(disable=True)
        load_s = time.time() - t0
        t1 = time.time()
        pipe("a red cat on a blue sofa", image_embeds=embeds, negative_image_embeds=negative, width=args.size,
             height=args.size, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
             callback=stamp, callback_steps=1, output_type="np")
        settings = {"dtype": "float32"}
    end = time.time()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    cpu_steps = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:], strict=False)]
    return {"impl": args.impl, "settings": settings, "size": args.size, "threads": torch.get_num_threads(),
            "load_s": round(load_s, 2), "call_s": round(end - t1, 2),
            "step_median_s": round(statistics.median(steps), 3) if steps else None,
            "step_cpu_median_s": round(statistics.median(cpu_steps), 3) if cpu_steps else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "run", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"run {argv} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def compare(args: argparse.Namespace) -> None:
    common = ["--model", str(args.model), "--size", str(args.size), "--steps", str(args.steps)] + (
        ["--threads", str(args.threads)] if args.threads else [])
    variants = {"diffusers": common + ["--impl", "diffusers"]}
    envs: dict[str, dict[str, str]] = {}
    if args.baseline:
        variants["before (fp32)"] = common + ["--impl", "ours"]
        envs["before (fp32)"] = {"PYTHONPATH": str(args.baseline.resolve() / "src")}
    for extra in args.ours or [""]:
        variants[f"ours {extra}".strip()] = common + ["--impl", "ours", *shlex.split(extra)]
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for _ in range(args.repeats):
        for name, argv in variants.items():
            r = _spawn(argv, envs.get(name))
            r["load_after"] = round(os.getloadavg()[0], 2)
            rows[name].append(r)
            print(json.dumps(r), flush=True)

    def med(name: str, key: str) -> float:
        values = [r[key] for r in rows[name] if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    ref = {key: med("diffusers", key) for key in ("peak_rss_mb", "step_median_s", "load_s", "call_s")}
    print(f"\ndecoder only, {args.size}x{args.size}, {args.steps} DDIM steps, medians of {args.repeats} runs each:")
    for name in variants:
        rss, step, cpu = med(name, "peak_rss_mb"), med(name, "step_median_s"), med(name, "step_cpu_median_s")
        print(f"  {name:32s} peak RSS {rss:7.0f} MB ({rss / ref['peak_rss_mb']:.2f}x)"
              f"  step {step:6.2f} s ({step / ref['step_median_s']:.2f}x), CPU {cpu:6.2f} s"
              f"  load {med(name, 'load_s'):5.1f} s  call {med(name, 'call_s'):6.1f} s")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--model", type=Path, required=True, help="a diffusers-format decoder folder")
        p.add_argument("--size", type=int, default=256)
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--threads", type=int, default=None)
    r = sub.choices["run"]
    r.add_argument("--impl", choices=("ours", "diffusers"), required=True)
    r.add_argument("--precision", default="fp32")
    r.add_argument("--low-memory", action="store_true")
    c = sub.choices["compare"]
    c.add_argument("--repeats", type=int, default=2)
    c.add_argument("--ours", action="append", help="options of one 'ours' variant (repeatable), e.g. '--low-memory'")
    c.add_argument("--baseline", type=Path, default=None,
                   help="also run ours from this source tree (its src/ first on PYTHONPATH), e.g. a git worktree "
                        "of an earlier commit, as 'before'")
    args = ap.parse_args()
    if args.cmd == "run":
        print(json.dumps(run(args)), flush=True)
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
