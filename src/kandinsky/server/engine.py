"""The model side of the server: load a :class:`~kandinsky.Kandinsky21` once and run jobs on it.

A job *spec* is a dict in the command line's record vocabulary (``mode prompt negative width height steps guidance
sampler seed num prior_steps prior_guidance strength image mask items``) whose ``image``/``mask`` are PIL images
and whose mix ``items`` are ``{"text": str}`` or ``{"image": PIL.Image}`` with a ``weight``. A spec with
``"seed_per_image": True`` (the AUTOMATIC1111 routes) makes ``num`` separate images with seeds ``seed + i``.
"""

from __future__ import annotations

import argparse
import math
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import PIL.Image

Report = Callable[..., None]  # report(stage, done, total, latents=None); may raise to cancel
MODES = ("txt2img", "img2img", "inpaint", "mix", "variations")


class Engine(Protocol):
    """What the worker needs from a model: load it, describe it, plan and run a job, preview a latent."""

    def load(self) -> None: ...

    def info(self) -> dict[str, Any]: ...

    def plan(self, spec: dict[str, Any]) -> dict[str, Any]: ...

    def run(self, spec: dict[str, Any], report: Report) -> list[tuple[PIL.Image.Image, dict[str, Any]]]: ...

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
    """The real model: the CLI's model options (``--model/--prior/--inpaint/--original/--device/--dtype/--compat``)
    name the folders; with none, the bundled model (with its inpainting decoder)."""

    def __init__(self, args: argparse.Namespace | None = None, pipe: Any = None,
                 model: dict[str, Any] | None = None) -> None:
        self.args = args if args is not None else argparse.Namespace()
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
        from .. import cli

        args = self.args
        choice = cli.model_choice(args)
        bundled = not any(choice.get(k) for k in ("model", "prior", "inpaint", "original"))
        want_inpaint = bool(choice.get("inpaint")) or (bundled and _bundled_inpaint()) or bool(choice.get("original"))
        need = ("decoder", "prior", "inpaint") if want_inpaint else ("decoder", "prior")
        try:
            pipe, model = cli.load_pipeline(args, need, choice)
        except FileNotFoundError:
            if not choice.get("original"):
                raise
            pipe, model = cli.load_pipeline(args, ("decoder", "prior"), choice)  # a release without inpainting
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

    def plan(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The resolved size and steps of a job, and its expected sampler steps in all (for progress)."""
        pipe = self.pipe
        mode = spec["mode"]
        a = pipe.resolve("decoder", width=spec.get("width"), height=spec.get("height"), steps=spec.get("steps"),
                         guidance_scale=spec.get("guidance"), sampler=spec.get("sampler"),
                         prior_steps=spec.get("prior_steps"), prior_guidance_scale=spec.get("prior_guidance"))
        image = spec.get("image")
        if mode in ("img2img", "inpaint") and image is not None:
            a["width"] = spec.get("width") or round64(image.width)
            a["height"] = spec.get("height") or round64(image.height)
        decoder_steps = a["steps"]
        if mode == "img2img":
            strength = spec.get("strength")
            strength = (0.7 if pipe.original else 0.3) if strength is None else strength
            decoder_steps = max(1, int(a["steps"] * ((1 - strength) if pipe.original else strength)))
        prior_runs = {"txt2img": 1, "img2img": 1, "inpaint": 1, "variations": 0,
                      "mix": sum("text" in it for it in spec.get("items") or []) + 1}[mode]
        if pipe.original and spec.get("negative") and mode != "mix":
            prior_runs += 1
        runs = (spec.get("num") or 1) if spec.get("seed_per_image") else 1
        units = runs * (prior_runs * a["prior_steps"] + decoder_steps)
        return {"width": a["width"], "height": a["height"], "steps": a["steps"], "prior_steps": a["prior_steps"],
                "units": units}

    # ------------------------------------------------------------------ running

    def run(self, spec: dict[str, Any], report: Report) -> list[tuple[PIL.Image.Image, dict[str, Any]]]:
        """Run one job; returns (image, metadata record) pairs. ``report`` gets every sampler step."""
        from .. import cli

        with self._lock:
            self._dispatch.target = report
            try:
                if spec.get("seed_per_image"):
                    count, out = spec.get("num") or 1, []
                    for k in range(count):
                        one = {**spec, "num": 1, "seed": spec["seed"] + k}
                        img = self._call(one)[0]
                        out.append((img, cli.make_record(_record_job(one), img.info.get("kandinsky", {}),
                                                         self.model)))
                    return out
                images = self._call(spec)
                num = spec.get("num") or 1
                return [(img, cli.make_record(_record_job(spec), img.info.get("kandinsky", {}), self.model,
                                              num=num, index=i)) for i, img in enumerate(images)]
            finally:
                self._dispatch.target = None

    def _call(self, job: dict[str, Any]) -> list[PIL.Image.Image]:
        pipe = self.pipe
        mode = job["mode"]
        kw: dict[str, Any] = dict(width=job.get("width"), height=job.get("height"), steps=job.get("steps"),
                                  guidance_scale=job.get("guidance"), sampler=job.get("sampler"), seed=job["seed"],
                                  num_images=job.get("num") or 1)
        if mode != "variations":
            kw.update(prior_steps=job.get("prior_steps"), prior_guidance_scale=job.get("prior_guidance"))
        if mode == "txt2img":
            return pipe.text_to_image(job["prompt"], job.get("negative"), **kw)
        if mode == "img2img":
            extra = {"strength": job["strength"]} if job.get("strength") is not None else {}
            return pipe.img2img(job["image"], job["prompt"], job.get("negative"), **extra, **kw)
        if mode == "inpaint":
            return pipe.inpaint(job["image"], job["mask"], job["prompt"], job.get("negative"), **kw)
        if mode == "mix":
            items = [it["text"] if "text" in it else it["image"] for it in job["items"]]
            weights = [float(it.get("weight", 1.0)) for it in job["items"]]
            return pipe.mix(items, weights, job.get("prompt") or "", negative_prompt=job.get("negative") or "", **kw)
        if mode == "variations":
            return pipe.variations(job["image"], job.get("prompt") or "", negative_prompt=job.get("negative"), **kw)
        raise ValueError(f"unknown mode {mode!r}")

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


def _bundled_inpaint() -> bool:
    from ..pipeline import ASSETS

    return (ASSETS / "inpaint").is_dir()


def _record_job(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the metadata record sees it: uploads are not files, so they are recorded as ``<upload>``."""
    job = {k: v for k, v in spec.items() if k not in ("image", "mask", "items", "seed_per_image")}
    if spec.get("image") is not None:
        job["image"] = "<upload>"
    if spec.get("mask") is not None:
        job["mask"] = "<upload>"
    if spec.get("items") is not None:
        job["items"] = [{"text": it["text"], "weight": it.get("weight", 1.0)} if "text" in it
                        else {"image": "<upload>", "weight": it.get("weight", 1.0)} for it in spec["items"]]
    return job
