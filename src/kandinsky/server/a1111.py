"""The AUTOMATIC1111 web-UI API subset that other tools speak: ``/sdapi/v1/txt2img``, ``/sdapi/v1/img2img``,
``/sdapi/v1/progress`` (and ``interrupt``, ``samplers``, ``sd-models``, ``options`` for clients that ask).

Field names and defaults are A1111's (``steps`` 50, ``cfg_scale`` 7, 512×512, ``seed`` -1 = random,
``denoising_strength`` 0.75); fields this model has no use for are accepted and ignored. A batch of ``batch_size
× n_iter`` images gets seeds ``seed, seed + 1, ...``, each image reproducible on its own. Sampler names map to
ours (``DDIM``, ``DDPM``, ``DPM++ 2M``…); other names (``Euler a``…) use the model's default sampler, and
``info`` says which one ran. With ``mask``, img2img inpaints (white = repaint; ``inpainting_mask_invert: 1``
flips it).
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__, metadata
from ..jobs import MAX_GUIDANCE, MAX_SIDE, MAX_STEPS, Job, new_seed
from .config import ServerConfig
from .errors import ERROR_RESPONSES, task_field_error
from .images import FieldError, decode_image, decode_mask
from .loras import LoraLibrary, split_prompt_tags
from .schemas import sampler_names
from .worker import Task, Worker

# A1111 name -> our samplers, best first (the first one this version has is used)
SAMPLER_ALIASES = {"ddim": ("ddim",), "ddpm": ("ddpm",), "p sampler": ("p_sampler",),
                   "dpm++ 2m": ("dpmpp_2m",), "dpm++ 2m karras": ("dpmpp_2m_karras", "dpmpp_2m"),
                   "unipc": ("unipc", "dpmpp_2m"), "unipc karras": ("unipc_karras", "unipc", "dpmpp_2m")}


class A1111Txt2Img(BaseModel):
    """``StableDiffusionProcessingTxt2Img``'s fields that matter here, with A1111's defaults."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    width: int = Field(512, ge=8, le=MAX_SIDE)
    height: int = Field(512, ge=8, le=MAX_SIDE)
    seed: int = Field(-1, ge=-1, le=2**63 - 1)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older name of sampler_name
    send_images: bool = True
    prior_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                    description="Kandinsky's prior steps (no A1111 field; default: the model's, "
                                                "at most the server's max_steps)")


class A1111Img2Img(A1111Txt2Img):
    """``StableDiffusionProcessingImg2Img``'s fields that matter here."""

    init_images: list[str] = Field(..., min_length=1)
    denoising_strength: float = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    mask: str | None = None
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


def sampler_id(name: str | None) -> str | None:
    """Our sampler for an A1111 sampler name; None (the model's default) for the ones we do not have."""
    if not name:
        return None
    have = sampler_names()
    key = name.strip().lower()
    if key in have:
        return key
    return next((s for s in SAMPLER_ALIASES.get(key, ()) if s in have), None)


def _job(mode: str, req: A1111Txt2Img, config: ServerConfig) -> Job:
    """The job of an A1111 request: caps checked, uploads decoded; ``batch_size × n_iter`` seeds in a row."""
    limits = config.limits
    count = req.batch_size * req.n_iter
    if count > limits.max_images:
        raise FieldError("batch_size", f"batch_size × n_iter = {count} images is over the limit of "
                                       f"{limits.max_images}")
    for key in ("steps", "prior_steps"):
        value = getattr(req, key)
        if value is not None and value > limits.max_steps:
            raise FieldError(key, f"{value} is over the limit of {limits.max_steps}")
    width, height = req.width // 8 * 8, req.height // 8 * 8  # as A1111, sizes are floored to multiples of 8
    if width * height > limits.max_pixels:
        raise FieldError("width", f"{width}×{height} = {width * height} pixels is over the limit of "
                                  f"{limits.max_pixels}")
    prompt, tags = split_prompt_tags(req.prompt)  # A1111 chooses adapters with <lora:NAME:SCALE> in the prompt
    loras = LoraLibrary(config.lora_dir).resolve(tags, field="prompt") if tags else None
    job = Job(mode=mode, prompt=prompt, negative=req.negative_prompt or None, width=width, height=height, loras=loras,
              steps=req.steps, prior_steps=req.prior_steps, guidance=req.cfg_scale,
              sampler=sampler_id(req.sampler_name or req.sampler_index),
              seed=req.seed if req.seed >= 0 else new_seed(), num=count, seed_per_image=True)
    if isinstance(req, A1111Img2Img):
        job.image = decode_image(req.init_images[0], "init_images[0]", limits)
        if req.mask:
            mask = decode_mask(req.mask, "mask", limits, job.image.size, resize=True)
            if req.inpainting_mask_invert:
                mask = mask.point(lambda v: 255 - v)
            job.mode, job.mask = "inpaint", mask
        else:
            if req.denoising_strength <= 0:
                raise FieldError("denoising_strength", "must be above 0 (0 would return the input unchanged)")
            job.strength = req.denoising_strength
    return job.validate()


def _info(task: Task, req: A1111Txt2Img) -> dict[str, Any]:
    images = task.result or []
    records = [im["record"] for im in images]
    first = records[0] if records else {}
    seeds = [r.get("seed") for r in records]
    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * len(records),
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * len(records),
        "seed": seeds[0] if seeds else None, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(records),
        "subseed_strength": 0, "width": first.get("width", req.width), "height": first.get("height", req.height),
        "sampler_name": metadata.SAMPLER_NAMES.get(first.get("sampler"), first.get("sampler")),
        "cfg_scale": first.get("guidance", req.cfg_scale), "steps": first.get("steps", req.steps),
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": metadata.model_label(first), "sd_model_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": getattr(req, "denoising_strength", None) if task.mode == "img2img" else None,
        "extra_generation_params": {"Mode": task.mode}, "index_of_first_image": 0,
        "infotexts": [im["parameters"] for im in images], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(task.created)), "clip_skip": 1,
        "is_using_inpainting_conditioning": task.mode == "inpaint", "version": f"kandinsky {__version__}",
    }


def add_a1111_routes(app: FastAPI, worker: Worker, config: ServerConfig) -> None:
    """Mount the ``/sdapi/v1`` routes."""
    submit = app.state.submit

    async def run(mode: str, req: A1111Txt2Img) -> Any:
        task = await submit(lambda: _job(mode, req, config), kind="a1111")
        await task.wait()
        if task.state != "done":
            if task.status == 422:
                return task_field_error(task)
            return JSONResponse(status_code=task.status if task.status >= 400 else 500,
                                content={"error": task.state, "detail": task.error or task.state,
                                         "errors": task.error or ""})
        images = [im["image"] for im in task.result or []] if req.send_images else []
        if isinstance(req, A1111Img2Img) and req.include_init_images:
            images += req.init_images
        return {"images": images, "parameters": req.model_dump(exclude={"init_images", "mask"}),
                "info": json.dumps(_info(task, req))}

    @app.post("/sdapi/v1/txt2img", tags=["automatic1111"], responses=ERROR_RESPONSES)
    async def txt2img(req: A1111Txt2Img) -> Any:
        """A1111 text to image: ``images`` (base64 PNGs) and ``info`` (a JSON string)."""
        return await run("txt2img", req)

    @app.post("/sdapi/v1/img2img", tags=["automatic1111"], responses=ERROR_RESPONSES)
    async def img2img(req: A1111Img2Img) -> Any:
        """A1111 img2img (``init_images``, ``denoising_strength``), or inpainting when ``mask`` is given."""
        return await run("img2img", req)

    @app.get("/sdapi/v1/progress", tags=["automatic1111"])
    async def progress(skip_current_image: bool = Query(False)) -> dict[str, Any]:
        """The running job's progress (0 to 1), ETA in seconds and latest preview."""
        task = worker.current
        queued = worker.queue_info()["pending"]
        if task is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "state": {"skipped": False, "interrupted": False, "job": "", "job_count": queued,
                              "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}
        p = task.progress
        fraction = float(p.get("fraction") or 0.0)
        elapsed = time.time() - (task.started or task.created)
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return {"progress": fraction, "eta_relative": round(eta, 3),
                "current_image": None if skip_current_image else task.preview,
                "textinfo": f"{task.mode}: {p.get('stage') or 'starting'} {p.get('done', 0)}/{p.get('total', 0)}",
                "state": {"skipped": False, "interrupted": task.cancel_requested, "job": task.id,
                          "job_count": queued + 1,
                          "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(task.created)),
                          "job_no": 0, "sampling_step": p.get("done", 0), "sampling_steps": p.get("total", 0)}}

    @app.post("/sdapi/v1/interrupt", tags=["automatic1111"])
    async def interrupt() -> dict[str, Any]:
        """Stop the running job at its next step."""
        task = worker.current
        if task is not None:
            worker.cancel(task)
        return {}

    @app.get("/sdapi/v1/samplers", tags=["automatic1111"])
    async def samplers() -> list[dict[str, Any]]:
        """The samplers, with their A1111-style names."""
        return [{"name": metadata.SAMPLER_NAMES.get(key, key), "aliases": [key], "options": {}}
                for key in sampler_names()]

    @app.get("/sdapi/v1/sd-models", tags=["automatic1111"])
    async def sd_models() -> list[dict[str, Any]]:
        """The one loaded model."""
        info = worker.engine.info()
        return [{"title": info.get("name"), "model_name": info.get("name"), "hash": None, "sha256": None,
                 "filename": info.get("decoder") or info.get("original"), "config": None}]

    @app.get("/sdapi/v1/options", tags=["automatic1111"])
    async def options() -> dict[str, Any]:
        """The few options clients read at connection."""
        return {"sd_model_checkpoint": worker.engine.info().get("name"), "samples_format": "png"}
