"""Quality of faster sampling settings on the bundled model, against its 100-step DDIM result of the same seeds.

For every configuration (decoder sampler and steps, prior steps, partial guidance, DeepCache) the 120 prompts of
``bench/quality.py`` are generated with the same seeds, scored by its attribute checker (``check``), and compared
pixel by pixel with the reference configuration (100 DDIM decoder steps, 25 prior steps: diffusers' defaults).
The prior and the decoder get separate generators (seed, seed + 1000003), so that every configuration starts the
decoder from the same noise and the pixel distance measures the sampler, not a shifted random stream.

    python bench/fast_quality.py [--decoder DIR --prior DIR] [--configs ref unipc20 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality import Found, cases, check  # noqa: E402

REFERENCE = "ddim100"
CONFIGS: dict[str, dict] = {
    "ddim100": dict(sampler="ddim", steps=100, prior_steps=25),
    "ddim50": dict(sampler="ddim", steps=50, prior_steps=25),
    "ddim20": dict(sampler="ddim", steps=20, prior_steps=25),
    "dpmpp20": dict(sampler="dpmpp_2m", steps=20, prior_steps=25),
    "dpmpp20k": dict(sampler="dpmpp_2m_karras", steps=20, prior_steps=25),
    "unipc20": dict(sampler="unipc", steps=20, prior_steps=25),
    "unipc20k": dict(sampler="unipc_karras", steps=20, prior_steps=25),
    "dpmpp15": dict(sampler="dpmpp_2m", steps=15, prior_steps=25),
    "unipc15": dict(sampler="unipc", steps=15, prior_steps=25),
    "unipc10": dict(sampler="unipc", steps=10, prior_steps=25),
    "unipc20-p10": dict(sampler="unipc", steps=20, prior_steps=10),
    "unipc20-p5": dict(sampler="unipc", steps=20, prior_steps=5),
    "unipc15-p10": dict(sampler="unipc", steps=15, prior_steps=10),
    "unipc20-cfg0.7": dict(sampler="unipc", steps=20, prior_steps=25, cfg_until=0.7),
    "unipc20-cfg0.5": dict(sampler="unipc", steps=20, prior_steps=25, cfg_until=0.5),
    "unipc20-dc2": dict(sampler="unipc", steps=20, prior_steps=25, deep_cache=2),
    "ddim100-dc2": dict(sampler="ddim", steps=100, prior_steps=25, deep_cache=2),
    "ddim100-dc3": dict(sampler="ddim", steps=100, prior_steps=25, deep_cache=3),
    "unipc20k-p10": dict(sampler="unipc_karras", steps=20, prior_steps=10),
    "unipc20k-p10-dc2": dict(sampler="unipc_karras", steps=20, prior_steps=10, deep_cache=2),
    "unipc20k-p10-dc3": dict(sampler="unipc_karras", steps=20, prior_steps=10, deep_cache=3),
    "unipc15k-p10": dict(sampler="unipc_karras", steps=15, prior_steps=10),
    "unipc15k-p10-dc2": dict(sampler="unipc_karras", steps=15, prior_steps=10, deep_cache=2),
    "unipc20k-p10-dc2-cfg0.7": dict(sampler="unipc_karras", steps=20, prior_steps=10, deep_cache=2, cfg_until=0.7),
    "unipc20k-dc2": dict(sampler="unipc_karras", steps=20, prior_steps=25, deep_cache=2),
    "fast": dict(preset="fast"),
}


def generate(pipe, config: dict, batch: int, seed: int) -> tuple[list[np.ndarray], float]:
    """Images (uint8) for all quality prompts under ``config``, and the process CPU seconds it took."""
    config = dict(config)
    prior_steps = config.pop("prior_steps", None)
    if config.get("preset") and prior_steps is None:
        prior_steps = pipe.resolve("decoder", preset=config["preset"], prior_steps=None)["prior_steps"]
    all_cases = cases(seed)
    images = []
    cpu = time.process_time()
    for start in range(0, len(all_cases), batch):
        prompts = [c.prompt for c in all_cases[start: start + batch]]
        emb = pipe.prior_embeds(prompts, steps=prior_steps or 25, seed=seed + start)
        out = pipe.text_to_image(prompts, image_embeds=emb.image, negative_image_embeds=emb.negative,
                                 seed=seed + start + 1000003, output="np", **config)
        images += [(img * 255).round().astype(np.uint8) for img in out]
    return images, time.process_time() - cpu


def score(images: list[np.ndarray], seed: int) -> dict:
    hits_c, hits_s = [], []
    for case, img in zip(cases(seed), images, strict=True):
        _, found = check(img)
        top = found[0] if found else Found("none", "none", 0)
        hits_c.append(top.color == case.color)
        hits_s.append(top.shape == case.shape)
    colour, shape = float(np.mean(hits_c)), float(np.mean(hits_s))
    return {"colour": colour, "shape": shape, "attribute": (colour + shape) / 2}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoder", type=Path, default=None)
    ap.add_argument("--prior", type=Path, default=None)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="keep each configuration's images here (npz) and "
                    "reuse them on later runs (same model and seed only)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kandinsky import Kandinsky21

    pipe = (Kandinsky21.from_pretrained(decoder=args.decoder, prior=args.prior) if args.decoder
            else Kandinsky21.from_pretrained())
    names = [REFERENCE] + [n for n in args.configs if n != REFERENCE]
    results: dict[str, dict] = {}
    ref_images: list[np.ndarray] | None = None
    print(f"{'config':<16} {'colour':>7} {'shape':>7} {'attr':>7} {'Δattr':>7} {'pixel dist':>10} {'CPU s':>7}")
    for name in names:
        cached = args.cache / f"{name}-seed{args.seed}.npz" if args.cache else None
        if cached is not None and cached.is_file():  # images of an earlier run of the same model and seed
            data = np.load(cached)
            images, cpu = list(data["images"]), float(data["cpu"])
        else:
            images, cpu = generate(pipe, CONFIGS[name], args.batch, args.seed)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(cached, images=np.stack(images), cpu=cpu)
        if ref_images is None:
            ref_images = images
        row = score(images, args.seed)
        row["pixel_distance"] = float(np.mean([np.abs(a.astype(np.float32) - b).mean()
                                               for a, b in zip(images, ref_images, strict=True)]))
        row["cpu_seconds"] = round(cpu, 1)
        row["config"] = CONFIGS[name]
        results[name] = row
        delta = 100 * (row["attribute"] - results[REFERENCE]["attribute"])
        print(f"{name:<16} {100 * row['colour']:6.1f}% {100 * row['shape']:6.1f}% {100 * row['attribute']:6.1f}% "
              f"{delta:+6.1f} {row['pixel_distance']:10.2f} {cpu:7.1f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; pixel distance: mean "
          "|image - reference| on 0..255, per channel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
