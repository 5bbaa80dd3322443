"""Tiled MoVQ decoding: memory and time at large sizes (published MoVQ), and seams (the bundled, trained MoVQ).

``memory``: one subprocess per mode (plain ``decode`` / ``decode_tiled``) decodes a random latent of the given
image size with the MoVQ of a decoder folder; each prints its peak resident memory and time.
``seams``: the bundled MoVQ encodes a collage of rendered shapes at the given size and decodes it plainly and in
tiles; prints the PSNR of each against the input and against each other, and the mean horizontal / vertical
pixel step on the tile borders relative to everywhere (1.0 = no seam), for both decodes.

    python bench/movq_tiles.py memory --decoder /tmp/k21/decoder --size 1024
    python bench/movq_tiles.py seams --size 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, since ``ru_maxrss`` carries the parent's peak over exec."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _decode_once(decoder: Path, size: int, tiled: bool, tile: int, threads: int | None) -> dict:
    from kandinsky.models.movq import MoVQ, MoVQConfig
    from kandinsky.weights.diffusers_format import DIFFUSERS_WEIGHTS, _build, _load_component
    from kandinsky.weights.io import read_json

    if threads:
        torch.set_num_threads(threads)
    movq = _load_component(_build(MoVQ, MoVQConfig.from_dict(read_json(decoder / "movq" / "config.json"))),
                           decoder / "movq", DIFFUSERS_WEIGHTS, dtype=torch.float32, device="cpu")
    f = movq.config.downscale_factor
    z = torch.randn(1, movq.config.latent_channels, size // f, size // f, generator=torch.Generator().manual_seed(0))
    base = _peak_rss_mb()
    t, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = movq.decode_tiled(z, tile=tile) if tiled else movq.decode(z)
    return {"mode": "tiled" if tiled else "plain", "size": size, "seconds": round(time.perf_counter() - t, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1), "rss_before_mb": round(base),
            "peak_rss_mb": round(_peak_rss_mb()),
            "finite": bool(torch.isfinite(out).all())}


def memory(args: argparse.Namespace) -> None:
    rows = []
    for mode in ("plain", "tiled"):
        cmd = [sys.executable, __file__, "one", "--decoder", str(args.decoder), "--size", str(args.size),
               "--tile", str(args.tile)] + (["--tiled"] if mode == "tiled" else []) + (
                   ["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            rows.append({"mode": mode, "size": args.size, "error": proc.stderr[-500:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(4.0 / max(mse, 1e-12))  # values in [-1, 1]: peak-to-peak 2


def _steps(img: np.ndarray, axis: int) -> np.ndarray:
    """Mean |pixel step| between neighbouring rows (axis 0) or columns (axis 1)."""
    return np.abs(np.diff(img, axis=axis)).mean(axis=tuple(i for i in range(img.ndim) if i != axis))


def seams(args: argparse.Namespace) -> None:
    import PIL.Image

    from kandinsky import Kandinsky21
    from kandinsky.models.movq import _tile_starts
    from kandinsky.train.shapes import make_scene, render

    pipe = Kandinsky21.from_pretrained()
    movq = pipe.decoder.movq
    f = movq.config.downscale_factor
    cells = 5  # collage edges away from the tile borders
    cell = args.size // cells
    combos = [("circle", "red", "white"), ("square", "blue", "yellow"), ("star", "green", "black"),
              ("triangle", "purple", "orange"), ("ring", "orange", "blue"), ("circle", "yellow", "purple")]
    canvas = PIL.Image.new("RGB", (args.size, args.size))
    for i in range(cells * cells):
        shape, color, bg = combos[i % len(combos)]
        tile = PIL.Image.fromarray(render(make_scene(shape, color, bg, size="big")))
        canvas.paste(tile.resize((cell, cell), PIL.Image.Resampling.BICUBIC), ((i % cells) * cell, (i // cells) * cell))
    x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.inference_mode():
        z = movq.encode(x)
        t = time.perf_counter()
        plain = movq.decode(z)
        t_plain = time.perf_counter() - t
        t = time.perf_counter()
        tiled = movq.decode_tiled(z, tile=args.tile, overlap=args.tile // 4)
        t_tiled = time.perf_counter() - t
    h = z.shape[-1]
    starts = _tile_starts(h, args.tile, args.tile // 4)
    # the blend regions of neighbouring tiles: the steps at every tile start and end inside the image
    borders = sorted({s * f for s in starts[1:]} | {(s + args.tile) * f for s in starts[:-1]})
    xs, ps, ts = (a[0].permute(1, 2, 0).numpy() for a in (x, plain, tiled))
    row = {"size": args.size, "latent": h, "tile": args.tile, "tiles": len(starts) ** 2,
           "psnr_plain_vs_input": round(_psnr(ps, xs), 2), "psnr_tiled_vs_input": round(_psnr(ts, xs), 2),
           "psnr_tiled_vs_plain": round(_psnr(ts, ps), 2),
           # pixel steps across the tile borders, tiled decode over plain decode of the same latent (1: no seam)
           "border_step_tiled_over_plain": round(float(np.mean([
               _steps(ts, a)[[b - 1 for b in borders]].mean() / _steps(ps, a)[[b - 1 for b in borders]].mean()
               for a in (0, 1)])), 3),
           "step_tiled_over_plain_everywhere": round(float(np.mean([_steps(ts, a).mean() / _steps(ps, a).mean()
                                                                     for a in (0, 1)])), 3),
           "seconds_plain": round(t_plain, 1), "seconds_tiled": round(t_tiled, 1)}
    print(json.dumps(row))
    if args.save:
        both = np.concatenate([ps, ts], axis=1)
        PIL.Image.fromarray(((both + 1) * 127.5).clip(0, 255).astype(np.uint8)).save(args.save)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("memory", "one", "seams"):
        p = sub.add_parser(name)
        p.add_argument("--size", type=int, default=1024)
        p.add_argument("--tile", type=int, default=64)
        p.add_argument("--threads", type=int, default=None)
        if name != "seams":
            p.add_argument("--decoder", type=Path, required=True)
    sub.choices["one"].add_argument("--tiled", action="store_true")
    sub.choices["seams"].add_argument("--save", type=Path, default=None, help="plain | tiled side by side (PNG)")
    args = ap.parse_args(argv)
    if args.cmd == "one":
        print(json.dumps(_decode_once(args.decoder, args.size, args.tiled, args.tile, args.threads)))
    elif args.cmd == "memory":
        memory(args)
    else:
        seams(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
