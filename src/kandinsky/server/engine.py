"""The model side of the server: load a :class:`~kandinsky.Kandinsky21` once and run jobs on it.

Jobs are :class:`kandinsky.jobs.Job` objects whose ``image``/``mask`` (and mix item images) are uploaded PIL images,
recorded as ``<upload>``; ``seed_per_image`` (the AUTOMATIC1111 routes) makes ``num`` separate images with seeds
``seed + i``. Loading and running are :mod:`kandinsky.jobs`'; this module adds the progress dispatch, the plan
(resolved sizes and expected steps, for limits and progress) and live previews.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import PIL.Image

from .. import jobs
from ..jobs import Job, ModelChoice

Report = Callable[..., None]  # report(stage, done, total, latents=None); may raise to cancel
MODES = ("txt2img", "img2img", "inpaint", "mix", "variations")


class Engine(Protocol):
    """What the worker needs from a model: load it, describe it, plan and run a job, preview a latent."""

    def load(self) -> None: ...

    def info(self) -> dict[str, Any]: ...

    def plan(self, job: Job) -> dict[str, Any]: ...

    def run(self, job: Job, report: Report) -> list[tuple[PIL.Image.Image, dict[str, Any]]]: ...

    def preview(self, mode: str, latents: Any, width: int, height: int, fraction: float = 1.0
                ) -> PIL.Image.Image | None: ...


class _Dispatch:
    """The pipeline's one progress callback; forwards to the running job's reporter (with the latents)."""

    wants_latents = True

    def __init__(self) -> None:
        self.target: Report | None = None

    def __call__(self, stage: str, done: int, total: int, latents: Any = None) -> None:
        if self.target is not None:
            self.target(stage, done, total, latents)


def round64(v: int) -> int:
    """The pipeline's default size for an input image side: rounded up to a multiple of 64."""
    return max(64, math.ceil(v / 64) * 64)


class PipelineEngine:
    """The real model: ``choice`` names the folders (the ``--model/--prior/--inpaint/--original/--device/--dtype/
    --compat`` options); by default the bundled model (with its inpainting decoder). Or an already loaded ``pipe``
    with its record ``model`` notes."""

    def __init__(self, choice: ModelChoice | None = None, pipe: Any = None,
                 model: dict[str, Any] | None = None) -> None:
        self.choice = choice if choice is not None else ModelChoice()
        self.pipe, self.model = pipe, dict(model or {})
        self._dispatch = _Dispatch()
        self._rgb: dict[str, Any] = {}
        self._lock = threading.Lock()
        if pipe is not None:
            pipe.set_progress(self._dispatch)

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Load the model (once); the worker calls this in its own thread."""
        if self.pipe is not None:
            return
        choice = self.choice
        want_inpaint = bool(choice.inpaint) or (choice.bundled and jobs.bundled_inpaint()) or bool(choice.original)
        need = ("decoder", "prior", "inpaint") if want_inpaint else ("decoder", "prior")
        try:
            pipe, model = jobs.load_pipeline(choice, need)
        except FileNotFoundError:
            if not choice.original:
                raise
            pipe, model = jobs.load_pipeline(choice, ("decoder", "prior"))  # a release without inpainting
        pipe.set_progress(self._dispatch)
        self.pipe, self.model = pipe, model

    def info(self) -> dict[str, Any]:
        """The model's name, folders, modes and recommended defaults (``GET /v1/models``)."""
        from .. import metadata

        pipe = self.pipe
        modes = [m for m in MODES if m != "inpaint" or (pipe is not None and pipe.inpaint_model is not None)]
        out: dict[str, Any] = {"name": metadata.model_label(self.model), "modes": modes,
                               "decoder": self.model.get("model") or ("bundled" if not self.model.get("original")
                                                                      else None),
                               "prior": self.model.get("prior") or ("bundled" if not self.model.get("original")
                                                                    else None),
                               "inpaint": (self.model.get("inpaint") or "bundled")
                               if pipe is not None and pipe.inpaint_model is not None else None,
                               "original": self.model.get("original"), "dtype": self.model.get("dtype"),
                               "compat": self.model.get("compat", "diffusers")}
        if pipe is not None:
            d = pipe.resolve("decoder", width=None, height=None, steps=None, guidance_scale=None, sampler=None,
                             prior_steps=None, prior_guidance_scale=None)
            out["defaults"] = {"width": d["width"], "height": d["height"], "steps": d["steps"],
                               "guidance": d["guidance_scale"], "sampler": d["sampler"],
                               "prior_steps": d["prior_steps"], "prior_guidance": d["prior_guidance_scale"],
                               "strength": 0.7 if pipe.original else 0.3}
            out["device"] = str(pipe.device)
        return out

    # ------------------------------------------------------------------ planning

    def plan(self, job: Job) -> dict[str, Any]:
        """The resolved size and steps of a job, and its expected sampler steps in all (for progress)."""
        pipe = self.pipe
        mode = job.mode
        a = jobs.resolved(pipe, job)
        image = job.image
        if mode in ("img2img", "inpaint") and image is not None:
            a["width"] = job.width or round64(image.width)
            a["height"] = job.height or round64(image.height)
        decoder_steps = a["steps"]
        if mode == "img2img":
            strength = job.strength
            strength = (0.7 if pipe.original else 0.3) if strength is None else strength
            decoder_steps = max(1, int(a["steps"] * ((1 - strength) if pipe.original else strength)))
        prior_runs = {"txt2img": 1, "img2img": 1, "inpaint": 1, "variations": 0,
                      "mix": len(job.texts) + 1}[mode]
        if pipe.original and job.negative and mode != "mix":
            prior_runs += 1
        runs = (job.num or 1) if job.seed_per_image else 1
        units = runs * (prior_runs * a["prior_steps"] + decoder_steps)
        return {"width": a["width"], "height": a["height"], "steps": a["steps"], "prior_steps": a["prior_steps"],
                "units": units}

    # ------------------------------------------------------------------ running

    def run(self, job: Job, report: Report) -> list[tuple[PIL.Image.Image, dict[str, Any]]]:
        """Run one job; returns (image, metadata record) pairs. ``report`` gets every sampler step."""
        with self._lock:
            self._dispatch.target = report
            try:
                return list(jobs.run(self.pipe, job, model=self.model))
            finally:
                self._dispatch.target = None

    # ------------------------------------------------------------------ previews

    def preview(self, mode: str, latents: Any, width: int, height: int, fraction: float = 1.0
                ) -> PIL.Image.Image | None:
        """A cheap RGB picture of the first decoder latent: a fixed linear map of its channels, fitted once per
        MoVQ by least squares on a few encoded colour fields, blurred early on (``fraction`` of the loop done)
        when the latent is mostly noise; ``None`` for anything but a decoder latent."""
        import PIL.ImageFilter
        import torch

        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            return None
        part = "inpaint" if mode == "inpaint" and self.pipe.inpaint_model is not None else "decoder"
        weights = self._rgb.get(part)
        if weights is None:
            parts = self.pipe.inpaint_model if part == "inpaint" else (self.pipe.decoder or self.pipe.inpaint_model)
            weights = self._rgb[part] = fit_latent_rgb(parts.movq, self.pipe.device, self.pipe.dtype)
        z = latents[0].detach().float().cpu()
        c = z.shape[0]
        if weights.shape[0] != c + 1:
            return None
        rgb = (z.permute(1, 2, 0) @ weights[:c] + weights[c]).clamp(-1, 1)
        arr = ((rgb + 1) * 127.5).round().to(torch.uint8).numpy()
        img = PIL.Image.fromarray(np.ascontiguousarray(arr), "RGB")
        radius = 2.0 * (1.0 - min(max(fraction, 0.0), 1.0))
        if radius > 0.2:
            img = img.filter(PIL.ImageFilter.GaussianBlur(radius))
        scale = min(1.0, 256 / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return img.resize(size, PIL.Image.Resampling.BILINEAR)


def fit_latent_rgb(movq: Any, device: Any, dtype: Any, samples: int = 12) -> Any:
    """A (C + 1, 3) matrix taking a latent pixel (and 1) to RGB in [-1, 1], fitted on encoded smooth colour
    fields, so that ``latent @ W[:C] + W[C]`` approximates the decoded image at latent resolution."""
    import torch
    import torch.nn.functional as F

    f = movq.config.downscale_factor
    g = torch.Generator().manual_seed(0)
    size = 16 * f
    low = torch.rand(samples, 3, 3, 3, generator=g) * 2 - 1
    images = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        z = movq.encode(images.to(device, dtype)).float().cpu()
    target = F.interpolate(images, size=z.shape[-2:], mode="area")
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x, y).solution
