"""The job layer under every front end (the command line, the HTTP server): what a generation *job* is, how it is
checked, run on a :class:`~kandinsky.pipeline.Kandinsky21` and recorded, and how the model is chosen and loaded.

A :class:`Job` speaks the metadata record's vocabulary (``mode prompt negative width height steps guidance sampler
seed num prior_steps prior_guidance image strength mask items frames interp``), so a record read back from an
image is a job again (:meth:`Job.from_dict`). :func:`run` returns each image with its record
(:func:`make_record`); :func:`load_pipeline` loads what a :class:`ModelChoice` names.

This module imports nothing heavy (torch and the pipeline load on first use) and no front end.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import PIL.Image

    from .pipeline import Kandinsky21

# ================================================================================================ vocabulary

# kandinsky.diffusion.samplers.SAMPLERS (spelt out so that importing this module does not import torch)
SAMPLER_CHOICES = ("ddim", "ddpm", "p_sampler",
                   "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_exponential",
                   "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2m_sde_exponential",
                   "unipc", "unipc_karras", "unipc_exponential",
                   "unipc3", "unipc3_karras", "unipc3_exponential")
INTERPOLATIONS = ("slerp", "lerp")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # kandinsky.precision.PRECISIONS
COMPATS = ("diffusers", "original")  # kandinsky.pipeline.COMPATS

COMMAND_MODE = {"generate": "txt2img", "img2img": "img2img", "inpaint": "inpaint", "mix": "mix",
                "variations": "variations", "morph": "morph"}
GEN_KEYS = ("prompt", "negative", "width", "height", "steps", "guidance", "sampler", "seed", "num", "loras")
PRIOR_KEYS = ("prior_steps", "prior_guidance")
MODE_KEYS: dict[str, tuple[str, ...]] = {
    "txt2img": GEN_KEYS + PRIOR_KEYS,
    "img2img": GEN_KEYS + PRIOR_KEYS + ("image", "strength"),
    "inpaint": GEN_KEYS + PRIOR_KEYS + ("image", "mask"),
    "mix": GEN_KEYS + PRIOR_KEYS + ("items",),
    "variations": GEN_KEYS + ("image",),
    "morph": tuple(k for k in GEN_KEYS if k != "num") + PRIOR_KEYS + ("items", "frames", "interp"),
}
MODES = tuple(MODE_KEYS)
NEEDS = {"txt2img": ("decoder", "prior"), "img2img": ("decoder", "prior"), "inpaint": ("inpaint", "prior"),
         "mix": ("decoder", "prior"), "variations": ("decoder", "prior"), "morph": ("decoder", "prior")}
MODEL_KEYS = ("model", "prior", "inpaint", "original")
RECORD_KEYS = set().union(*MODE_KEYS.values()) | {"mode", "index", "frame", "dtype", "compat"} | set(MODEL_KEYS)
ALIASES = {"negative_prompt": "negative", "guidance_scale": "guidance", "cfg_scale": "guidance",
           "prior_guidance_scale": "prior_guidance", "num_images": "num", "init_image": "image"}
# keys of the pipeline's img.info["kandinsky"] -> record keys
INFO_KEYS = {"width": "width", "height": "height", "steps": "steps", "guidance_scale": "guidance",
             "sampler": "sampler", "prior_steps": "prior_steps", "prior_guidance_scale": "prior_guidance",
             "strength": "strength", "seed": "seed"}
UPLOAD = "<upload>"  # how a record names an input image that is not a file (an HTTP upload)
# sanity ceilings of Job.validate (front ends may set lower ones, as the server does)
MAX_SIDE = 16384  # width, height: pixels a side
MAX_STEPS = 1000  # steps, prior_steps: the published noise schedules' length (more steps cannot run)
MAX_COUNT = 1000  # num, frames, mix/morph items
MAX_GUIDANCE = 1000.0  # guidance, prior_guidance: far above any useful scale; ~1e30 makes images of NaN
MAX_LORA_SCALE = 100.0  # |scale| of a LoRA adapter

ModelNotes = dict[str, Any]  # what a record notes about the model: folders, dtype, compat (see load_pipeline)
Progress = Callable[[int, int], None]


class JobError(ValueError):
    """A job that cannot run as given. ``field`` names the culprit (``width``, ``items[1].image`` ...);
    ``str()`` is one line that says what to change."""

    def __init__(self, field: str, message: str) -> None:
        message = _one_line(message)
        super().__init__(message)
        self.field, self.message = str(field), message


_BREAKS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str, limit: int = 1000) -> str:
    """``text`` as one printable line of at most about ``limit`` characters: line breaks and other control
    characters shown as escapes, the middle of an over-long message (a huge path) left out."""
    text = _BREAKS.sub(lambda m: repr(m.group())[1:-1], str(text))
    if len(text) > limit:
        text = f"{text[: limit * 6 // 10]} ... {text[-(limit * 3 // 10):]}"
    return text


def _show(value: Any, limit: int = 60) -> str:
    """A value in a message: its repr, shortened."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile object's repr
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unicode_error(text: str) -> str | None:
    """Why ``text`` is not valid Unicode text (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate {text[exc.start]!r} at position {exc.start}"
    return None


def _finite(v: Any) -> bool:
    """A real number (not a bool) that is finite as a float."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


class Unavailable(RuntimeError):
    """A part of kandinsky, or a package it needs, that this installation lacks."""


def new_seed() -> int:
    """A fresh random seed (what a job without one gets; always recorded)."""
    return secrets.randbelow(2**32)


def canonical_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with the accepted aliases (``negative_prompt``, ``cfg_scale``, ``num_images`` ...) renamed."""
    return {ALIASES.get(k, k) if isinstance(k, str) else k: v for k, v in data.items()}


def _is_path(value: Any) -> bool:
    return isinstance(value, str | os.PathLike)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ================================================================================================ the job


@dataclass
class Item:
    """A mix ingredient or a morph key frame: a prompt (``text``) or an ``image`` (a file path, or a PIL image
    such as an HTTP upload), with a mix ``weight`` (None: 1, and left out of the record)."""

    text: str | None = None
    image: str | os.PathLike | PIL.Image.Image | None = None
    weight: float | None = None

    @classmethod
    def from_value(cls, value: Any, mode: str, where: str) -> Item:
        """An item from ``{"text": ...}`` or ``{"image": ...}`` (plus ``weight``); ``where`` names it in errors."""
        if isinstance(value, Item):
            return value
        if not isinstance(value, Mapping) or not ({"text", "image"} & set(value)):
            raise JobError(where, f"bad {mode} item {_show(value)}: expected {{'text': ...}} or {{'image': ...}}")
        unknown = sorted(str(k) for k in set(value) - {"text", "image", "weight"})
        if unknown:
            raise JobError(f"{where}.{unknown[0]}", f"bad {mode} item {_show(value)}: unknown key "
                                                    f"{', '.join(unknown)[:200]}")
        if "text" in value and "image" in value:
            raise JobError(where, f"bad {mode} item {_show(value)}: give one of 'text' or 'image', not both")
        return cls(text=value.get("text"), image=value.get("image"), weight=value.get("weight"))

    def to_record(self) -> dict[str, Any]:
        """The item as a record shows it (an image that is not a file is ``<upload>``)."""
        out: dict[str, Any] = ({"text": self.text} if self.text is not None else
                               {"image": str(self.image) if _is_path(self.image) else UPLOAD})
        if self.weight is not None:
            out["weight"] = self.weight
        return out


@dataclass
class Job:
    """One generation request in any mode. Unset (None) values take the model folder's defaults, then the
    published ones; ``seed`` None means a fresh random seed at run time.

    ``image``/``mask`` are file paths or PIL images. ``seed_per_image`` makes ``num`` separate runs with seeds
    ``seed, seed + 1, ...`` (AUTOMATIC1111 batches) instead of ``num`` images drawn from one generator.
    """

    mode: str = "txt2img"
    prompt: str | None = None
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    seed: int | None = None
    num: int | None = None
    prior_steps: int | None = None
    prior_guidance: float | None = None
    image: str | os.PathLike | PIL.Image.Image | None = None
    strength: float | None = None
    mask: str | os.PathLike | PIL.Image.Image | None = None
    items: list[Item] | None = None
    frames: int | None = None
    interp: str | None = None
    loras: list[tuple[str, float]] | None = None  # LoRA adapters: (path, scale); "PATH[:SCALE]" strings accepted
    seed_per_image: bool = False

    def __post_init__(self) -> None:
        if self.loras is not None:
            self.loras = _lora_list(self.loras)
        if self.items is not None:
            if isinstance(self.items, str | bytes | Mapping) or not isinstance(self.items, Iterable):
                raise JobError("items", f"{self.mode} items must be a list of {{'text': ...}} or {{'image': ...}}")
            self.items = [Item.from_value(it, self.mode, f"items[{i}]") for i, it in enumerate(self.items)]

    # ------------------------------------------------------------------ building

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], mode: str | None = None, *, strict: bool = True) -> Job:
        """A job from a plain mapping in the record vocabulary (aliases such as ``negative_prompt`` accepted):
        a ``--prompts`` line, an HTTP body, a metadata record. ``mode`` defaults to ``data["mode"]``, then
        ``txt2img``. Keys the mode does not use are refused, naming the key, unless ``strict`` is false (then they
        are ignored: a record's ``index``, ``dtype``, ``version`` ...). Values are checked by :meth:`validate`."""
        if not isinstance(data, Mapping):
            raise JobError("job", f"a job must be a mapping of fields, got {type(data).__name__}")
        values = canonical_keys(data)
        given_mode = values.pop("mode", None)
        mode = mode or given_mode or "txt2img"
        if not isinstance(mode, str) or mode not in MODE_KEYS:
            raise JobError("mode", f"unknown mode {_show(mode)}; use one of {', '.join(MODES)}")
        if strict and given_mode not in (None, mode):
            raise JobError("mode", f"mode {_show(given_mode)} does not match this {mode} job")
        allowed = MODE_KEYS[mode]
        unknown = sorted(str(k) for k in set(values) - set(allowed))
        if unknown and strict:
            shown = ", ".join(unknown)
            shown = shown if len(shown) <= 200 else shown[:197] + "..."
            raise JobError(unknown[0], f"unknown key{'s' if len(unknown) > 1 else ''} {shown}; "
                                       f"use {', '.join(sorted(allowed))}")
        return cls(mode=mode, **{k: v for k, v in values.items() if k in allowed})

    def replace(self, **changes: Any) -> Job:
        """A copy with ``changes``."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ checking

    def validate(self) -> Job:
        """Fast checks before any model is loaded: types, ranges, sizes, counts, prompts valid Unicode, input
        images readable, mask size. Raises :class:`JobError`; returns the job."""
        mode = self.mode
        if not isinstance(mode, str) or mode not in MODE_KEYS:
            raise JobError("mode", f"unknown mode {_show(mode)}; use one of {', '.join(MODES)}")
        for key in ("width", "height"):
            v = getattr(self, key)
            if v is not None and (not _is_int(v) or v <= 0 or v % 8):
                raise JobError(key, f"{key} must be a positive multiple of 8, got {_show(v)}")
            if v is not None and v > MAX_SIDE:
                raise JobError(key, f"{key} {v} is over the limit of {MAX_SIDE} pixels")
        for key, most in (("steps", MAX_STEPS), ("prior_steps", MAX_STEPS), ("num", MAX_COUNT),
                          ("frames", MAX_COUNT)):
            v = getattr(self, key)
            if v is not None and (not _is_int(v) or v < 1):
                raise JobError(key, f"{key} must be a positive integer, got {_show(v)}")
            if v is not None and v > most:
                raise JobError(key, f"{key} {v} is over the limit of {most}")
        seed = self.seed
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
            raise JobError("seed", f"seed must be an integer in [0, 2^64), got {_show(seed)}")
        if seed is not None and self.seed_per_image and seed + (self.num or 1) - 1 >= 2**64:
            raise JobError("seed", f"seed {seed} + {(self.num or 1) - 1} (one seed per image) is not below 2^64")
        for key in ("guidance", "prior_guidance", "strength"):
            v = getattr(self, key)
            if v is not None and (not _finite(v) or v < 0):
                raise JobError(key, f"{key} must be a non-negative number, got {_show(v)}")
            if v is not None and key != "strength" and v > MAX_GUIDANCE:
                raise JobError(key, f"{key} {v!r} is over the limit of {MAX_GUIDANCE:g}")
        if self.strength is not None and not 0 <= self.strength <= 1:  # run() checks the end points
            raise JobError("strength", f"strength must be in [0, 1], got {self.strength!r}")
        if self.sampler is not None and (not isinstance(self.sampler, str) or self.sampler not in SAMPLER_CHOICES):
            raise JobError("sampler", f"unknown sampler {_show(self.sampler)}; choose one of "
                                      f"{', '.join(SAMPLER_CHOICES)}")
        for key in ("prompt", "negative"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise JobError(key, f"{key} must be a string, got {_show(v)}")
            if v is not None and (why := _unicode_error(v)):
                raise JobError(key, f"{key} is not valid Unicode text: {why}")
        if self.interp is not None and (not isinstance(self.interp, str) or self.interp not in INTERPOLATIONS):
            raise JobError("interp", f"unknown interpolation {_show(self.interp)}; choose one of "
                                     f"{', '.join(INTERPOLATIONS)}")
        for i, (path, scale) in enumerate(self.loras or []):
            if not isinstance(path, str | os.PathLike) or not str(path):
                raise JobError(f"loras[{i}]", f"a LoRA adapter is a path, got {_show(path)}")
            if not _finite(scale) or abs(scale) > MAX_LORA_SCALE:
                raise JobError(f"loras[{i}].scale", f"a LoRA scale must be a finite number within "
                                                    f"±{MAX_LORA_SCALE:g}, got {_show(scale)}")
            if (why := _unicode_error(str(path))) or "\x00" in str(path):
                raise JobError(f"loras[{i}]", f"the LoRA path is not a valid path: {why or 'a NUL character'}")
            if not Path(path).exists():
                raise JobError(f"loras[{i}]", f"LoRA adapter not found: {_show(str(path), 300)}")
        if mode in ("txt2img", "img2img", "inpaint") and self.prompt is None:
            raise JobError("prompt", "no prompt given; pass PROMPT or --prompt")
        if mode in ("img2img", "inpaint", "variations"):
            if not _given(self.image):
                raise JobError("image", f"{mode} needs an input image: pass --image PATH")
            image = _open(self.image, "image", "image")
            if mode == "inpaint":
                if not _given(self.mask):
                    raise JobError("mask", "inpaint needs a mask: pass --mask PATH (white = repaint)")
                mask = _open(self.mask, "mask", "mask")
                if mask.size != image.size:
                    raise JobError("mask", f"mask is {mask.width}×{mask.height} but the image is "
                                           f"{image.width}×{image.height}; give a mask of the image's size")
        if mode in ("mix", "morph"):
            items = self.items or []
            least = 2 if mode == "morph" else 1
            if len(items) < least:
                raise JobError("items", f"{mode} needs at least {least} --text/--image item{'s' if least > 1 else ''}")
            if len(items) > MAX_COUNT:
                raise JobError("items", f"{len(items)} {mode} items is over the limit of {MAX_COUNT}")
            for i, item in enumerate(items):
                if item.text is None and not _given(item.image):
                    raise JobError(f"items[{i}]", f"a {mode} item needs a 'text' or an 'image'")
                if item.text is not None and not isinstance(item.text, str):
                    raise JobError(f"items[{i}].text", f"a {mode} item's text must be a string, got "
                                                       f"{_show(item.text)}")
                if item.text is not None and (why := _unicode_error(item.text)):
                    raise JobError(f"items[{i}].text", f"a {mode} item's text is not valid Unicode text: {why}")
                if item.image is not None:
                    _open(item.image, "image", f"items[{i}].image")
                w = item.weight
                if w is not None and not _finite(w):
                    raise JobError(f"items[{i}].weight", f"a {mode} weight must be a finite number, got {_show(w)}")
            if mode == "morph" and self.frames is not None and self.frames < len(items):
                raise JobError("frames", f"--frames {self.frames} is fewer than the {len(items)} key frames")
        return self

    # ------------------------------------------------------------------ views

    def to_record(self) -> dict[str, Any]:
        """The job's part of a metadata record: ``mode``, ``negative`` and every set field (image inputs that are
        not files are ``<upload>``)."""
        out: dict[str, Any] = {"mode": self.mode}
        for f in fields(self):
            if f.name in ("mode", "seed_per_image"):
                continue
            value = getattr(self, f.name)
            if value is None and f.name != "negative":
                continue
            if f.name in ("image", "mask"):
                value = str(value) if _is_path(value) else UPLOAD
            elif f.name == "items":
                value = [it.to_record() for it in value]
            elif f.name == "loras":
                if not value:
                    continue
                value = [[str(path), scale] for path, scale in value]
            out[f.name] = value
        return out

    @property
    def texts(self) -> list[str]:
        """The prompts of the items (mix, morph)."""
        return [it.text for it in self.items or [] if it.text is not None]


def lora_spec(text: str) -> tuple[str, float]:
    """``"PATH[:SCALE]"`` (the CLI form) -> (path, scale); the scale is 1 when absent (``C:/x`` is a path)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*|\s*[-+]?(inf|nan)\s*", tail, re.I):
        return head, float(tail)
    return text, 1.0


def _lora_list(value: Any) -> list[tuple[Any, Any]]:
    """LoRA adapters as (path, scale) pairs from pairs, ``{"path": ..., "scale": ...}`` mappings or
    ``"PATH[:SCALE]"`` strings (scale 1 when absent); values are checked by :meth:`Job.validate`."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise JobError("loras", f"loras must be a list of [path, scale] pairs, got {_show(value)}")
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, str):
            out.append(lora_spec(entry))
        elif isinstance(entry, Mapping) and "path" in entry and set(entry) <= {"path", "scale"}:
            out.append((entry["path"], entry.get("scale", 1.0)))
        elif isinstance(entry, list | tuple) and len(entry) == 2:
            out.append((entry[0], entry[1]))
        else:
            raise JobError(f"loras[{i}]", f"a LoRA adapter is PATH[:SCALE], [path, scale] or {{'path', 'scale'}}, "
                                          f"got {_show(entry)}")
    return out


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value)


def _open(image: Any, what: str, field: str) -> PIL.Image.Image:
    from . import imaging

    try:
        return imaging.open_image(image, what)
    except (OSError, ValueError) as exc:
        raise JobError(field, str(exc)) from exc


def mix_weights(weights: Sequence[float], raw: bool = False, hint: str = "use raw weights") -> list[float]:
    """Mix weights divided by their sum (unless ``raw``); ``hint`` says how to ask for raw weights."""
    weights = [float(w) for w in weights]
    if raw:
        return weights
    total = sum(weights)
    if not total > 0:
        raise JobError("items", f"the mix weights sum to {total:g}; they are divided by their sum, so it must be "
                                f"positive (or {hint})")
    return [w / total for w in weights]


# ================================================================================================ running


class Output(NamedTuple):
    """One generated image and its metadata record."""

    image: PIL.Image.Image
    record: dict[str, Any]


def make_record(job: Job, info: Mapping[str, Any], model: Mapping[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
    """The metadata record of one output image: the job, the values the pipeline resolved (``info``: the image's
    ``info["kandinsky"]``), ``extra`` (``num``/``index``, ``frame``), the model notes and the version."""
    from . import __version__

    model = model or {}
    record = job.to_record()
    for key, name in INFO_KEYS.items():
        if info.get(key) is not None:
            record[name] = info[key]
    record.update(extra)
    for key in MODEL_KEYS:
        if model.get(key):
            record[key] = model[key]
    record["dtype"] = model.get("dtype")
    record["compat"] = model.get("compat", "diffusers")
    record["version"] = __version__
    return record


def resolved(pipe: Kandinsky21, job: Job) -> dict[str, Any]:
    """The job's sizes, steps, guidance and sampler with unset ones filled from the model folder's defaults, then
    the published ones (record keys)."""
    a = pipe.resolve("decoder", width=job.width, height=job.height, steps=job.steps, guidance_scale=job.guidance,
                     sampler=job.sampler, prior_steps=job.prior_steps, prior_guidance_scale=job.prior_guidance)
    return {INFO_KEYS[k]: v for k, v in a.items()}


def _call_kwargs(job: Job, prior: bool = True) -> dict[str, Any]:
    kw = dict(width=job.width, height=job.height, steps=job.steps, guidance_scale=job.guidance, sampler=job.sampler,
              seed=job.seed, num_images=job.num or 1)
    if prior:
        kw.update(prior_steps=job.prior_steps, prior_guidance_scale=job.prior_guidance)
    return kw


def _as_input(image: Any) -> Any:
    return Path(image) if _is_path(image) else image


def check_strength(pipe: Kandinsky21, strength: float | None) -> None:
    """The img2img strength end point the pipeline's ``compat`` excludes (diffusers: 0 denoises nothing; original:
    1 keeps nothing), refused as a :class:`JobError` before any work."""
    if strength is None:
        return
    if getattr(pipe, "original", False):
        if strength >= 1:
            raise JobError("strength", f"strength must be in [0, 1) with compat original (the fraction kept), "
                                       f"got {strength!r}")
    elif strength <= 0:
        raise JobError("strength", f"strength must be in (0, 1] (the fraction re-drawn), got {strength!r}")


def generate(pipe: Kandinsky21, job: Job) -> list[PIL.Image.Image]:
    """One pipeline call for a job of any mode but morph (``num`` images from one generator)."""
    mode = job.mode
    if job.seed is None:
        raise JobError("seed", "a job must have its seed before it runs")
    if mode == "txt2img":
        return pipe.text_to_image(job.prompt, job.negative, **_call_kwargs(job))
    if mode == "img2img":
        extra = {"strength": job.strength} if job.strength is not None else {}
        check_strength(pipe, job.strength)
        return pipe.img2img(job.image, job.prompt, job.negative, **extra, **_call_kwargs(job))
    if mode == "inpaint":
        return pipe.inpaint(job.image, job.mask, job.prompt, job.negative, **_call_kwargs(job))
    if mode == "mix":
        items = job.items or []
        inputs = [it.text if it.text is not None else _as_input(it.image) for it in items]
        weights = [1.0 if it.weight is None else float(it.weight) for it in items]
        return pipe.mix(inputs, weights, job.prompt or "", negative_prompt=job.negative or "", **_call_kwargs(job))
    if mode == "variations":
        return pipe.variations(job.image, job.prompt or "", negative_prompt=job.negative,
                               **_call_kwargs(job, prior=False))
    raise JobError("mode", f"unknown mode {mode!r}")


def run(pipe: Kandinsky21, job: Job, progress: Progress | None = None, *, model: ModelNotes | None = None,
        frames: Sequence[int] | None = None) -> list[Output]:
    """Run a job; returns every image with its metadata record.

    A job without a seed gets a fresh one (the records say which). ``model``: the notes :func:`load_pipeline`
    returned, for the records. ``progress(done, total)`` is called after each pipeline call: once, or per image
    with ``seed_per_image``, or per morph frame. ``frames``: the morph frames to decode (default all).
    Per-step progress is the pipeline's own (:meth:`Kandinsky21.set_progress`).
    """
    if job.seed is None:
        job = job.replace(seed=new_seed())
    if job.loras:
        with pipe.loras([(Path(path), float(scale)) for path, scale in job.loras]):
            return _run(pipe, job, progress, model, frames)
    return _run(pipe, job, progress, model, frames)


def _run(pipe: Kandinsky21, job: Job, progress: Progress | None, model: ModelNotes | None,
         frames: Sequence[int] | None) -> list[Output]:
    if job.mode == "morph":
        return run_morph(pipe, job, frames, progress, model=model)
    if job.seed_per_image:
        count, out = job.num or 1, []
        for k in range(count):
            one = job.replace(num=1, seed=job.seed + k, seed_per_image=False)
            img = generate(pipe, one)[0]
            out.append(Output(img, make_record(one, img.info.get("kandinsky", {}), model)))
            if progress is not None:
                progress(k + 1, count)
        return out
    images = generate(pipe, job)
    num = job.num or 1
    if progress is not None:
        progress(1, 1)
    return [Output(img, make_record(job, img.info.get("kandinsky", {}), model, num=num, index=i))
            for i, img in enumerate(images)]


# ================================================================================================ morph


def slerp(a: Any, b: Any, t: float) -> Any:
    """Spherical interpolation of directions with linearly interpolated norms (rows of ``a`` and ``b``)."""
    import torch

    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    ua, ub = a64 / na.clamp_min(1e-12), b64 / nb.clamp_min(1e-12)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1, 1))
    so = torch.sin(omega)
    safe = so.abs() > 1e-6
    w_a = torch.where(safe, torch.sin((1 - t) * omega) / torch.where(safe, so, 1), torch.full_like(so, 1 - t))
    w_b = torch.where(safe, torch.sin(t * omega) / torch.where(safe, so, 1), torch.full_like(so, t))
    direction = w_a * ua + w_b * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (direction * ((1 - t) * na + t * nb)).to(a.dtype)


def morph_path(keys: list[Any], frames: int, interp: str) -> list[Any]:
    """``frames`` embeddings walking through the key embeddings at constant parameter speed."""
    out = []
    segments = len(keys) - 1
    for i in range(frames):
        pos = i * segments / (frames - 1)
        j = min(int(pos), segments - 1)
        t = pos - j
        a, b = keys[j], keys[j + 1]
        out.append(slerp(a, b, t) if interp == "slerp" else (a.double() * (1 - t) + b.double() * t).to(a.dtype))
    return out


def run_morph(pipe: Kandinsky21, job: Job, frames: Sequence[int] | None = None, progress: Progress | None = None,
              *, model: ModelNotes | None = None) -> list[Output]:
    """Decode the chosen frames of a morph (default all): the key frames' image embeddings interpolated, every
    frame with the same seed, hence the same noise. Records carry ``frame``."""
    a = resolved(pipe, job)
    seed, total = job.seed, job.frames or 16
    if seed is None:
        raise JobError("seed", "a job must have its seed before it runs")
    for i in frames or ():
        if not _is_int(i) or not 0 <= i < total:
            raise JobError("frames", f"frame {_show(i)} is not one of the {total} frames (0 to {total - 1})")
    keys = []
    for item in job.items or []:
        if item.text is not None:
            keys.append(pipe.prior_embeds(item.text, None, a["prior_steps"], a["prior_guidance"], seed=seed).image)
        else:
            keys.append(pipe.image_embeds([_as_input(item.image)]))
    if job.negative is None:
        negative = pipe.zero_image_embeds(1)
    else:
        negative = pipe.prior_embeds(job.negative, None, a["prior_steps"], a["prior_guidance"], seed=seed).image
    path = morph_path(keys, total, job.interp or "slerp")
    wanted = list(range(total) if frames is None else frames)
    out = []
    for n, i in enumerate(wanted):
        img = pipe.text_to_image(job.prompt or "", image_embeds=path[i], negative_image_embeds=negative,
                                 width=a["width"], height=a["height"], steps=a["steps"], guidance_scale=a["guidance"],
                                 sampler=a["sampler"], seed=seed)[0]
        img.info.setdefault("kandinsky", {}).update(prior_steps=a["prior_steps"],
                                                    prior_guidance_scale=a["prior_guidance"])
        out.append(Output(img, make_record(job, img.info["kandinsky"], model, frame=i)))
        if progress is not None:
            progress(n + 1, len(wanted))
    return out


# ================================================================================================ models


@dataclass
class ModelChoice:
    """Which model to load and how: diffusers-layout folders (``model`` = the decoder; None = the bundled one)
    or the ``original`` release (a folder or its Hub id), the dtype, the sampling ``compat``, the device and the
    speed options."""

    model: str | None = None
    prior: str | None = None
    inpaint: str | None = None
    original: str | None = None
    dtype: str | None = None  # DTYPES; None/auto: float16 on cuda, else float32
    precision: str | None = None  # kandinsky.precision.PRECISIONS; another way to give dtype ("auto": measured)
    compat: str | None = None  # COMPATS; None: diffusers
    device: str | None = None  # DEVICES; None/auto: cuda, then mps, then cpu
    low_memory: bool = False
    compile: bool = False
    tile_decode: str | None = None  # "auto" (None), "on", "off"

    @classmethod
    def from_options(cls, options: Any) -> ModelChoice:
        """From any object with these attributes (parsed :func:`add_model_arguments` options); absent = default."""
        return cls(**{f.name: getattr(options, f.name, None) or f.default for f in fields(cls)})

    @property
    def bundled(self) -> bool:
        """True when no folder is named (the bundled model)."""
        return not any((self.model, self.prior, self.inpaint, self.original))


class Loaded(NamedTuple):
    """A loaded pipeline and what its images' records note about it (:data:`ModelNotes`)."""

    pipe: Kandinsky21
    model: ModelNotes


def add_model_arguments(p: argparse.ArgumentParser, speed: bool = False) -> None:
    """The command-line options of a :class:`ModelChoice` (``--model/--prior/--inpaint/--original/--device/
    --dtype/--compat``, with ``speed`` also ``--low-memory/--compile/--tile-decode``)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="decoder folder (diffusers kandinsky-2-1 layout; default: bundled)")
    g.add_argument("--prior", metavar="DIR", help="prior folder (kandinsky-2-1-prior layout; default: bundled)")
    g.add_argument("--inpaint", metavar="DIR", help="inpainting decoder folder (default: bundled)")
    g.add_argument("--original", metavar="DIR|HUB_ID",
                   help="the original (non-diffusers) release: a folder of its files, or its Hub id "
                        "ai-forever/Kandinsky_2.1[@REV] (shortcut kandinsky-2-1-original); OpenAI's CLIP and its "
                        "tokenizer are fetched as the release does")
    g.add_argument("--device", choices=DEVICES, help="default: auto (cuda, then mps, then cpu)")
    g.add_argument("--dtype", choices=DTYPES, help="default: auto (float16 on cuda, else float32)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="fp32, bf16, fp16, or auto: the fastest this CPU computes correctly (measured once, cached; "
                        "`kandinsky info --system` shows it); another way to give --dtype")
    g.add_argument("--compat", choices=COMPATS,
                   help="diffusers (default) or original: the ai-forever repository's sampling semantics "
                        "(img2img strength = fraction kept, inpaint mask white = keep)")
    if speed:
        g.add_argument("--low-memory", action="store_true",
                       help="drop each model from memory once its part of a run is done (text encoders, prior, UNet "
                            "packed weights) and decode large images in tiles")
        g.add_argument("--compile", action="store_true",
                       help="run the UNet through torch.compile (slow first run, cached; falls back to eager)")
        g.add_argument("--tile-decode", choices=("auto", "on", "off"), default="auto",
                       help="MoVQ decoding in tiles: auto (above 1024x1024, or 512x512 with --low-memory)")


def optional_module(name: str, what: str, required: bool = True) -> Any:
    """Import a part of kandinsky that may be absent from this version: :class:`Unavailable` (or None when not
    ``required``) if it is, and :class:`Unavailable` naming the package if a dependency is missing."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if name == missing or name.startswith(missing + "."):
            if not required:
                return None
            raise Unavailable(f"{what} is not installed in this version") from exc
        raise Unavailable(f"{what} needs the '{missing}' package; install it") from exc


def _bundled(role: str) -> Path:
    from .pipeline import ASSETS

    folder = ASSETS / role
    if not folder.is_dir():
        flag = {"decoder": "--model", "prior": "--prior", "inpaint": "--inpaint"}[role]
        raise FileNotFoundError(f"no bundled {role} model in {ASSETS}; pass {flag} DIR (a diffusers-format folder)")
    return folder


def load_pipeline(choice: ModelChoice, need: Sequence[str]) -> Loaded:
    """Load the parts ``need`` names (``decoder``, ``prior``, ``inpaint``; see :data:`NEEDS`); returns the
    pipeline and what the records note about the model."""
    import torch

    from .pipeline import Kandinsky21, resolve_device

    for key, allowed in (("dtype", DTYPES), ("compat", COMPATS)):  # a --from record's may be anything
        value = getattr(choice, key)
        if value is not None and (not isinstance(value, str) or value not in allowed):
            raise ValueError(f"unknown {key} {_show(value)}; use one of {', '.join(allowed)}")
    device = resolve_device(choice.device or "auto")
    dtype = choice.dtype or "auto"
    if dtype == "auto":
        dtype = "float16" if device.type == "cuda" else "float32"
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if choice.precision is not None:
        from . import precision

        chosen = precision.resolve(choice.precision, device)
        if choice.dtype not in (None, "auto") and chosen != torch_dtype:
            raise ValueError(f"--dtype {choice.dtype} and --precision {choice.precision} disagree; give one of them")
        torch_dtype, dtype = chosen, str(chosen).removeprefix("torch.")
    compat = choice.compat or "diffusers"
    noted: ModelNotes = {"dtype": dtype, "compat": compat}
    speed = dict(low_memory=bool(choice.low_memory), compile=bool(choice.compile),
                 tile_decode={"on": True, "off": False}.get(choice.tile_decode or "auto"))
    if choice.original:
        original = optional_module("kandinsky.weights.original_format", "--original (the original checkpoint format)")
        from .weights import hub, original_hub

        folder = Path(choice.original)  # a Hub id: the release's (a diffusers one is refused with what to use)
        by_id = not folder.is_dir() and (original_hub.is_hub_id(choice.original) or hub.is_hub_id(choice.original))
        if not by_id and not folder.is_dir():
            raise FileNotFoundError(f"original model folder not found: {folder}")
        decoder, prior, inpaint = original.load_original(choice.original if by_id else folder, device=device,
                                                         dtype=torch_dtype, inpaint="inpaint" in need)
        pipe = Kandinsky21(decoder=decoder if "decoder" in need else None, prior=prior,
                           inpaint=inpaint if "inpaint" in need else None, device=device, dtype=torch_dtype,
                           compat=compat, **speed)
        noted["original"] = choice.original if by_id else str(folder.resolve())  # an id is recorded as given
        return Loaded(pipe, noted)
    folders: dict[str, Path] = {}
    for role, key in (("decoder", "model"), ("prior", "prior"), ("inpaint", "inpaint")):
        if role not in need:
            continue
        given = getattr(choice, key)
        folder = Path(given) if given else _bundled(role)
        from .weights import hub

        if given and hub.is_hub_id(str(given)):  # a Hub id: the cached (or downloaded) snapshot; the id is recorded
            folders[role], noted[key] = hub.resolve(str(given)), str(given)
            continue
        if given and not folder.is_dir():
            raise FileNotFoundError(f"{role} model folder not found: {folder}")
        folders[role] = folder
        noted[key] = str(folder.resolve()) if given else None
    pipe = Kandinsky21.from_pretrained(decoder=folders.get("decoder"), prior=folders.get("prior"),
                                       inpaint=folders.get("inpaint"), device=device, dtype=dtype, compat=compat,
                                       **speed)
    return Loaded(pipe, noted)


def bundled_inpaint() -> bool:
    """True when the bundled model has its inpainting decoder."""
    from .pipeline import ASSETS

    return (ASSETS / "inpaint").is_dir()
