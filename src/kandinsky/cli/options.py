"""From parsed options to the job layer: the job fields given on the command line and the model choice."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..jobs import MODE_KEYS, ModelChoice, lora_spec, mix_weights
from ..weights import hub, original_hub
from .common import CLIError, note


def split_weight(spec: str, kind: str) -> tuple[str, float | None]:
    """``"PROMPT[:WEIGHT]"`` -> (prompt, weight or None): the weight is a number after the last colon."""
    if kind == "image" and Path(spec).is_file():
        return spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return spec, None
        if math.isfinite(weight):
            return head, weight
    return spec, None


def items_from_args(specs: list[tuple[str, str]] | None, mode: str, raw: bool) -> list[dict[str, Any]] | None:
    """``--text``/``--image`` items as job items; for mix with weights (divided by their sum unless ``raw``)."""
    if not specs:
        return None
    items, weights = [], []
    for kind, spec in specs:
        value, weight = split_weight(spec, kind) if mode == "mix" else (spec, None)
        items.append({kind: str(Path(value).resolve()) if kind == "image" else value})
        weights.append(1.0 if weight is None else weight)
    if mode == "mix":
        for item, weight in zip(items, mix_weights(weights, raw, hint="pass --raw-weights"), strict=True):
            item["weight"] = weight
    return items


def job_options(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The job fields of ``mode`` given on the command line (absent options are left out; input paths are made
    absolute; ``--fast`` fills unset ones with the preset's values, so that the record regenerates the image)."""
    job: dict[str, Any] = {}
    pos = getattr(args, "prompt_pos", None)
    if pos is not None:
        if getattr(args, "prompt", None) is not None:
            raise CLIError("give the prompt once: either as an argument or with --prompt")
        job["prompt"] = pos
    for key in MODE_KEYS[mode]:
        value = getattr(args, key, None)
        if key == "items":
            value = items_from_args(value, mode, getattr(args, "raw_weights", False))
        elif key in ("image", "mask") and value is not None:
            value = str(Path(value).resolve())
        elif key == "loras" and value is not None:
            value = [(str(Path(path).resolve()), scale) for path, scale in (lora_spec(v) for v in value)]
        if value is not None:
            job[key] = value
    if getattr(args, "fast", False):
        from ..pipeline import PRESETS

        for key, value in PRESETS["fast"].items():
            if key in MODE_KEYS[mode]:
                job.setdefault(key, value)
    return job


def model_choice(args: argparse.Namespace, record: dict[str, Any] | None = None) -> ModelChoice:
    """The model options: the command line's, else those recorded in a ``--from`` image, else the bundled model."""
    choice = ModelChoice.from_options(args)
    choice.compat = choice.compat or (record or {}).get("compat")
    if record and not choice.original:
        given = any((choice.model, choice.prior, choice.inpaint))
        for key in ("model", "prior", "inpaint") if given else ("model", "prior", "inpaint", "original"):
            path = record.get(key)
            if getattr(choice, key) or not path or not isinstance(path, str):
                continue
            ids = original_hub if key == "original" else hub  # the release's ids include its shortcut
            if Path(path).exists() or ids.is_hub_id(str(path)):  # a folder, or a Hub id (resolved when loading)
                setattr(choice, key, path)
            else:
                note(args, f"the recorded {key} folder {path} is missing; using the default")
    if record and choice.dtype is None and choice.precision is None:  # --precision chooses anew
        choice.dtype = record.get("dtype")
    return choice
