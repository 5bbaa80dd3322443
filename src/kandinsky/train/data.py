"""The training set on disk (``<out>/data/train.npz``) and the batch helpers the stages share."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..imaging import CLIP_MEAN, CLIP_STD
from . import shapes
from .shapes import Obj, Scene, ShapesData


def scene_to_dict(s: Scene) -> dict:
    return {"background": s.background, "objects": [asdict(o) for o in s.objects], "rgb": [list(c) for c in s.rgb]}


def scene_from_dict(d: dict) -> Scene:
    return Scene(d["background"], tuple(Obj(**o) for o in d["objects"]), tuple(tuple(c) for c in d["rgb"]))


def prepare(folder: Path, n: int, seed: int, size: int) -> ShapesData:
    """Generate the training set into ``folder`` unless the same one (n, seed, size) is already there."""
    folder = Path(folder)
    path, meta_path = folder / "train.npz", folder / "meta.json"
    meta = {"n": n, "seed": seed, "size": size, "held_out": sorted(map(list, shapes.HELD_OUT))}
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return load(folder)
    data = shapes.generate(n, seed, held_out=False, size=size)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = json.dumps([scene_to_dict(s) for s in data.scenes], ensure_ascii=False)
    tmp = folder / "train.tmp.npz"
    np.savez(tmp, images=data.images, scenes=np.frombuffer(scenes.encode(), dtype=np.uint8))
    tmp.replace(path)
    meta_path.write_text(json.dumps(meta))
    return data


def load(folder: Path) -> ShapesData:
    path = Path(folder) / "train.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no training data in {folder}; run `kandinsky train data --out DIR` first")
    with np.load(path) as z:
        images = z["images"]
        scenes = [scene_from_dict(d) for d in json.loads(z["scenes"].tobytes().decode())]
    return ShapesData(images, scenes)


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (the MoVQ's input)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_clip_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> CLIP-normalised pixels (B, 3, H, W), as the image processor makes them."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() * (1 / 255)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def sample_indices(n: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (batch,), generator=gen)


def captions_for(scenes: list[Scene], rng: random.Random, lang: str | None = None,
                 drop: float = 0.0) -> list[str]:
    """One random caption per scene; with probability ``drop`` the empty caption (condition dropout)."""
    return ["" if drop and rng.random() < drop else shapes.caption(s, rng, lang) for s in scenes]
