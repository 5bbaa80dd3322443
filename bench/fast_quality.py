"""Quality of faster sampling settings on the bundled model, against its 100-step DDIM result of the same seeds.

For every configuration (decoder sampler and steps, prior steps, partial guidance, DeepCache) the 120 prompts of
``bench/quality.py`` are generated with the same seeds, scored by its attribute checker (``check``), and compared
pixel by pixel with the reference configuration (100 DDIM decoder steps, 25 prior steps: diffusers' defaults).
The prior and the decoder get separate generators (seed, seed + 1000003), so that every configuration starts the
decoder from the same noise and the pixel distance measures the sampler, not a shifted random stream. Guidance
scales are the model's defaults (``resolve``), as a user of the preset gets them.

``--seeds N`` runs seeds S .. S+N-1 (S = ``--seed``) and reports per configuration the attribute accuracy
averaged over the seeds, its spread (sample standard deviation over seeds), the mean paired difference to the
reference with its standard error, the pixel distance, the decoder UNet evaluations per image (a guided step
counts 2, an unguided one 1) and the process CPU seconds per seed (after a warm-up generation).
``--cache DIR`` keeps each configuration's images per seed (keyed by its resolved settings and the model folders)
and reuses them, with their CPU seconds, on later runs.

    python bench/fast_quality.py [--decoder DIR --prior DIR] [--configs ref unipc20 ...] [--seeds 6]
                                 [--threads 1] [--cache DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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
# 8-16 decoder steps: name = solver + steps + spacing (k Karras, e exponential, none: diffusers' default) + prior
_SOLVER_TAGS = {"unipc": "unipc", "unipc3": "unipc3-", "dpmpp_2m": "dpmpp", "dpmpp_2m_sde": "sde"}
for _solver, _tag in _SOLVER_TAGS.items():
    for _steps in (8, 10, 12, 16):
        for _spacing, _letter in (("", ""), ("_karras", "k"), ("_exponential", "e")):
            for _prior in (10, 5):
                CONFIGS[f"{_tag}{_steps}{_letter}-p{_prior}"] = dict(sampler=_solver + _spacing, steps=_steps,
                                                                    prior_steps=_prior)
for _steps in (10, 12, 16):  # cheaper guidance: classifier-free guidance on the first part of the steps only
    for _until in (0.5, 0.7, 0.8):
        CONFIGS[f"unipc{_steps}k-p10-cfg{_until}"] = dict(sampler="unipc_karras", steps=_steps, prior_steps=10,
                                                         cfg_until=_until)
# the focused set run by default (docs/benchmarks.md, "Fewer steps: 8-16 decoder steps": 3 seeds; the
# reference, unipc20k-p10 (the 20-step fast preset before), unipc12k-p10, unipc10k-p10 and unipc10k-p5: 6 seeds)
SWEEP = ["ddim100", "unipc20k-p10", "unipc16k-p10", "unipc12k-p10", "unipc10k-p10", "unipc8k-p10", "unipc12k-p5",
         "unipc10k-p5", "unipc3-12k-p10", "dpmpp12k-p10", "sde12k-p10", "unipc16k-p10-cfg0.7"]
SETTINGS = ("sampler", "steps", "prior_steps", "guidance_scale", "prior_guidance_scale", "cfg_until", "deep_cache")


def resolved(pipe, config: dict) -> dict:
    """The configuration's full sampling settings (preset and model defaults filled in)."""
    config = dict(config)
    preset = config.pop("preset", None)
    return pipe.resolve("decoder", preset=preset, **{k: config.get(k) for k in SETTINGS})


def decoder_evals(settings: dict) -> int:
    """Decoder UNet evaluations per image: a guided step runs the conditional and the unconditional half."""
    steps = settings["steps"]
    guided = math.ceil(settings["cfg_until"] * steps) if settings["guidance_scale"] > 1 else 0
    return 2 * guided + (steps - guided)


def generate(pipe, settings: dict, batch: int, seed: int) -> tuple[list[np.ndarray], float]:
    """Images (uint8) for all quality prompts under the resolved ``settings``, and the process CPU seconds."""
    decoder = {k: settings[k] for k in ("sampler", "steps", "guidance_scale", "cfg_until", "deep_cache")}
    all_cases = cases(seed)
    images = []
    cpu = time.process_time()
    for start in range(0, len(all_cases), batch):
        prompts = [c.prompt for c in all_cases[start: start + batch]]
        emb = pipe.prior_embeds(prompts, steps=settings["prior_steps"],
                                guidance_scale=settings["prior_guidance_scale"], seed=seed + start)
        out = pipe.text_to_image(prompts, image_embeds=emb.image, negative_image_embeds=emb.negative,
                                 seed=seed + start + 1000003, output="np", **decoder)
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


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def markdown(results: dict[str, dict]) -> str:
    """The results as a markdown table (percentages and points)."""
    lines = ["| configuration | sampler | decoder steps | prior steps | guided steps | decoder UNet evals | attribute "
             "(mean ± sd over seeds) | Δ vs DDIM 100 (± se) | worst seed Δ | pixel distance | CPU s per seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s = r["settings"]
        guided = math.ceil(s["cfg_until"] * s["steps"])
        lines.append(f"| {name} | {s['sampler']} | {s['steps']} | {s['prior_steps']} | {guided} | "
                     f"{r['decoder_evals']} | {100 * r['attribute']:.1f} ± {100 * r['attribute_sd']:.1f} | "
                     f"{100 * r['delta']:+.1f} (± {100 * r['delta_se']:.1f}) | {100 * r['delta_min']:+.1f} | "
                     f"{r['pixel_distance']:.2f} | {r['cpu_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoder", type=Path, default=None)
    ap.add_argument("--prior", type=Path, default=None)
    ap.add_argument("--configs", nargs="+", default=SWEEP, choices=list(CONFIGS), metavar="NAME",
                    help=f"configurations (default: the focused sweep); all: {', '.join(CONFIGS)}")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed + 1, ...)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", action="store_true", help="also print the results as a markdown table")
    ap.add_argument("--cache", type=Path, default=None, help="keep each configuration's images here (npz, per "
                    "seed) and reuse them on later runs")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from kandinsky import Kandinsky21

    pipe = (Kandinsky21.from_pretrained(decoder=args.decoder, prior=args.prior) if args.decoder
            else Kandinsky21.from_pretrained())
    seeds = list(range(args.seed, args.seed + args.seeds))
    names = [REFERENCE] + [n for n in args.configs if n != REFERENCE]
    model = f"{args.decoder or 'bundled'}|{args.prior or 'bundled'}"
    warm = False
    results: dict[str, dict] = {}
    ref_images: dict[int, list[np.ndarray]] = {}
    print(f"seeds {seeds[0]}..{seeds[-1]}; torch threads {torch.get_num_threads()}")
    print(f"{'config':<22} {'evals':>5} {'attr':>6} {'sd':>5} {'Δattr':>6} {'±se':>5} {'min Δ':>6} {'colour':>6} "
          f"{'shape':>6} {'pixel':>6} {'CPU s':>6}")
    for name in names:
        settings = resolved(pipe, CONFIGS[name])
        key = hashlib.sha1(json.dumps([settings, model], sort_keys=True).encode()).hexdigest()[:10]
        per_seed = []
        for seed in seeds:
            cached = args.cache / f"{name}-{key}-seed{seed}.npz" if args.cache else None
            if cached is not None and cached.is_file():  # images of an earlier run of the same settings and seed
                data = np.load(cached)
                images, cpu = list(data["images"]), float(data["cpu"])
            else:
                if not warm:  # first-call costs (weight packing, page-ins) stay out of the timings
                    pipe.text_to_image("a red circle", steps=2, prior_steps=2, seed=0, output="np")
                    warm = True
                images, cpu = generate(pipe, settings, args.batch, seed)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(cached, images=np.stack(images), cpu=cpu)
            ref = ref_images.setdefault(seed, images)
            row = score(images, seed)
            row["pixel_distance"] = float(np.mean([np.abs(a.astype(np.float32) - b).mean()
                                                   for a, b in zip(images, ref, strict=True)]))
            row["cpu_seconds"] = round(cpu, 1)
            row["seed"] = seed
            per_seed.append(row)
        attr, sd = _mean_sd([r["attribute"] for r in per_seed])
        ref_rows = results[REFERENCE]["per_seed"] if name != REFERENCE else per_seed
        deltas = [r["attribute"] - q["attribute"] for r, q in zip(per_seed, ref_rows, strict=True)]
        delta, delta_sd = _mean_sd(deltas)
        results[name] = {
            "config": CONFIGS[name], "settings": settings, "decoder_evals": decoder_evals(settings),
            "seeds": seeds, "attribute": attr, "attribute_sd": sd, "delta": delta,
            "delta_se": delta_sd / math.sqrt(len(seeds)), "delta_min": min(deltas), "delta_max": max(deltas),
            "colour": float(np.mean([r["colour"] for r in per_seed])),
            "shape": float(np.mean([r["shape"] for r in per_seed])),
            "pixel_distance": float(np.mean([r["pixel_distance"] for r in per_seed])),
            "cpu_seconds": float(np.mean([r["cpu_seconds"] for r in per_seed])), "per_seed": per_seed,
        }
        r = results[name]
        print(f"{name:<22} {r['decoder_evals']:5d} {100 * attr:6.1f} {100 * sd:5.1f} {100 * delta:+6.1f} "
              f"{100 * r['delta_se']:5.1f} {100 * r['delta_min']:+6.1f} {100 * r['colour']:6.1f} "
              f"{100 * r['shape']:6.1f} {r['pixel_distance']:6.2f} {r['cpu_seconds']:6.1f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    if args.markdown:
        print(markdown(results))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; attr: mean over seeds of "
          "the mean of colour and shape accuracy (%), sd over seeds; Δattr: mean paired difference to the reference "
          "(points) ± its standard error, min Δ the worst seed; pixel: mean |image - reference| on 0..255; CPU s: "
          "process CPU seconds per seed (120 images, prior + decoder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
