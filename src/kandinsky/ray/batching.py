"""Several txt2img jobs through one decoder loop, each caller keeping exactly its own images, seeds and records.

A job alone draws, from one generator seeded with its seed: the prior's noise (and the prior sampler's), then the
decoder's initial latents. Batched, each job still does exactly that with its own generator (the prior runs per
job), and only the decoder runs once over the rows of all jobs, started from those latents. With a deterministic
decoder sampler (DDIM, DPM-Solver++, UniPC) nothing else draws noise, so a batched image differs from the same job
alone only by floating-point rounding of the larger batch: ``tests/test_ray.py`` measures it (bit-identical PNGs
on the bundled model on CPU; docs/ray.md).

Compatible jobs (:func:`batch_key`) share the resolved size, steps, guidance and sampler; prompts, negative
prompts, seeds and counts may differ. ``seed_per_image`` jobs (the A1111 routes) become one row per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .. import jobs
from ..jobs import Job, Output

DETERMINISTIC = ("ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "unipc_karras")  # no noise drawn in the loop
Progress = Callable[[int, str, int, int, Any], None]  # (job index, stage, done, total, that job's latents)


def batch_key(pipe: Any, job: Job) -> tuple[Any, ...] | None:
    """Jobs with equal keys can share one decoder batch; None for a job that must run alone (not txt2img, a
    sampler that draws noise per step, LoRA adapters, ``compat="original"``, ``low_memory``)."""
    if (job.mode != "txt2img" or job.seed is None or getattr(job, "loras", None) or getattr(pipe, "original", True)
            or getattr(pipe, "low_memory", False)):
        return None
    a = jobs.resolved(pipe, job)
    if a["sampler"] not in DETERMINISTIC:
        return None
    return tuple(a[k] for k in ("width", "height", "steps", "guidance", "sampler", "prior_steps", "prior_guidance"))


def _runs(job: Job) -> list[tuple[Job, int, dict[str, Any]]]:
    """(job of one generator, images, record extras) as :func:`kandinsky.jobs.run` splits a job."""
    if job.seed_per_image:
        return [(job.replace(num=1, seed=job.seed + k, seed_per_image=False), 1, {}) for k in range(job.num or 1)]
    return [(job, job.num or 1, {})]


def run_batched(pipe: Any, batch: Sequence[Job], model: jobs.ModelNotes | None = None,
                progress: Progress | None = None) -> list[list[Output]]:
    """Run compatible jobs (equal :func:`batch_key`) with one decoder loop; returns each job's outputs, as
    :func:`kandinsky.jobs.run` would for that job alone. ``progress(i, stage, done, total, latents)`` gets each
    job's prior steps and every decoder step (with that job's rows of the latents)."""
    import torch

    from ..diffusion import samplers
    from ..pipeline import latent_size

    keys = {batch_key(pipe, job) for job in batch}
    if None in keys or len(keys) != 1:
        raise ValueError("run_batched needs txt2img jobs with a deterministic sampler and equal sizes, steps, "
                         "guidance and sampler")
    a = jobs.resolved(pipe, batch[0])
    parts = pipe.decoder
    lh, lw = latent_size(a["height"], a["width"], parts.movq.config.downscale_factor)
    channels = parts.movq.config.latent_channels
    runs: list[tuple[int, Job, int, dict[str, Any]]] = [(i, *r) for i, job in enumerate(batch) for r in _runs(job)]
    spans: dict[int, list[int]] = {}  # job index -> its rows in the batch
    image, negative, noise, prompts = [], [], [], []
    saved = pipe.progress
    try:
        for i, one, n, _ in runs:
            spans.setdefault(i, []).extend(range(len(prompts), len(prompts) + n))
            generator = torch.Generator("cpu").manual_seed(int(one.seed))  # Kandinsky21.make_generator
            pipe.set_progress(_prior_progress(i, progress))
            e = pipe.prior_embeds([one.prompt], one.negative, a["prior_steps"], a["prior_guidance"], num_images=n,
                                  generator=generator)
            image.append(e.image)
            negative.append(e.negative)
            noise.append(samplers.randn((n, channels, lh, lw), generator, pipe.dtype, pipe.device))
            prompts += [one.prompt] * n
        pipe.set_progress(_decoder_progress(spans, progress))
        images = pipe.text_to_image(prompts, None, image_embeds=torch.cat(image), negative_image_embeds=torch.cat(
            negative), latents=torch.cat(noise), width=a["width"], height=a["height"], steps=a["steps"],
            guidance_scale=a["guidance"], sampler=a["sampler"], prior_steps=a["prior_steps"],
            prior_guidance_scale=a["prior_guidance"], seed=0)
    finally:
        pipe.progress = saved
    out: list[list[Output]] = [[] for _ in batch]
    row = 0
    for i, one, n, _ in runs:
        for k in range(n):
            img = images[row]
            row += 1
            info = img.info["kandinsky"] = {**img.info.get("kandinsky", {}), "prompt": one.prompt,
                                            "negative_prompt": one.negative, "seed": one.seed}
            extra = {} if batch[i].seed_per_image else {"num": n, "index": k}
            out[i].append(Output(img, jobs.make_record(one, info, model, **extra)))
    return out


class _Reporter:
    wants_latents = True

    def __init__(self, call: Callable[..., None]) -> None:
        self.call = call

    def __call__(self, stage: str, done: int, total: int, latents: Any = None) -> None:
        self.call(stage, done, total, latents)


def _prior_progress(i: int, progress: Progress | None) -> Any:
    if progress is None:
        return None
    return _Reporter(lambda stage, done, total, latents: progress(i, stage, done, total, None))


def _decoder_progress(spans: dict[int, list[int]], progress: Progress | None) -> Any:
    if progress is None:
        return None

    def call(stage: str, done: int, total: int, latents: Any) -> None:
        for i, rows in spans.items():
            progress(i, stage, done, total, None if latents is None else latents[rows[0]:rows[-1] + 1])

    return _Reporter(call)
