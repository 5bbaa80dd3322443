"""A training run's folder: the preset it uses, where each stage keeps its outputs, and loaders for them.

Layout of ``--out DIR``::

    run.json                      preset and seed of the run (fixed by the first stage that runs)
    data/train.npz                the rendered training set
    tokenizers/{clip,mclip}/      transformers tokenizers
    <stage>/ckpt/                 resumable checkpoint;  <stage>/log.jsonl  losses
    <stage>/final.safetensors     trained weights;       <stage>/done.json  time and metrics
    clip/embeds.safetensors       CLIP image embeddings of the training set, zero-image embedding, mean/std
    movq/latents.safetensors      MoVQ latents of the training set
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..models.text_encoders import MultilingualCLIP
from . import config as C
from . import data, vocab
from .common import write_json
from .config import Preset, StageSchedule


@dataclass
class Workspace:
    """The output folder of a run, its preset and seed."""

    root: Path
    preset: Preset
    seed: int = 0
    progress: bool = True

    @classmethod
    def open(cls, root: Path | str, preset: str | None = None, seed: int | None = None, progress: bool = True,
             overrides: dict[str, Any] | None = None) -> Workspace:
        """Open (or create) a run folder. A folder remembers its preset and seed; asking for others fails."""
        root = Path(root)
        meta_path = root / "run.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if preset is not None and preset != meta["preset"]:
                raise ValueError(f"{root} was started with preset {meta['preset']!r}, not {preset!r}; "
                                 "use another --out folder")
            if seed is not None and seed != meta["seed"]:
                raise ValueError(f"{root} was started with seed {meta['seed']}, not {seed}; use another --out")
            overrides = {**meta.get("overrides", {}), **(overrides or {})}
            preset, seed = meta["preset"], meta["seed"]
        preset = preset or "bundled"
        seed = 0 if seed is None else seed
        p = C.get_preset(preset)
        for stage, sched in (overrides or {}).items():
            p.schedules = {**p.schedules, stage: StageSchedule(**{**vars(p.schedules[stage]), **sched})}
        root.mkdir(parents=True, exist_ok=True)
        write_json(meta_path, {"preset": preset, "seed": seed, "overrides": overrides or {}})
        return cls(root, p, seed, progress)

    def dir(self, stage: str) -> Path:
        path = self.root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- stage bookkeeping -------------------------------------------------------------------------------------

    def done(self, stage: str) -> dict[str, Any] | None:
        path = self.root / stage / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def mark_done(self, stage: str, info: dict[str, Any]) -> None:
        write_json(self.root / stage / "done.json", info)

    def require(self, stage: str) -> dict[str, Any]:
        info = self.done(stage)
        if info is None:
            raise FileNotFoundError(f"stage {stage!r} has not finished in {self.root}; "
                                    f"run `python -m kandinsky.train {stage} --out {self.root}` first")
        return info

    # -- loaders -----------------------------------------------------------------------------------------------

    def data(self) -> data.ShapesData:
        return data.prepare(self.root / "data", self.preset.n_images, self.seed, self.preset.image_size)

    def clip_tokenizer(self) -> Any:
        self.require("tokenizers")
        return vocab.load_clip_tokenizer(self.root / "tokenizers" / "clip")

    def mclip_tokenizer(self) -> Any:
        self.require("tokenizers")
        return vocab.load_mclip_tokenizer(self.root / "tokenizers" / "mclip")

    def clip_text_config(self) -> dict[str, Any]:
        tok = self.clip_tokenizer()
        return C.clip_text_config(self.preset, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)

    def weights(self, stage: str) -> dict[str, torch.Tensor]:
        self.require(stage)
        return load_file(str(self.root / stage / "final.safetensors"))

    def clip_models(self) -> tuple[Any, Any]:
        """The trained (text, vision) CLIP towers, frozen, in eval mode."""
        text, vision = C.build_clip(self.preset, self.clip_text_config())
        w = self.weights("clip")
        text.load_state_dict(_sub(w, "text"))
        vision.load_state_dict(_sub(w, "vision"))
        return text.eval().requires_grad_(False), vision.eval().requires_grad_(False)

    def mclip_model(self) -> MultilingualCLIP:
        model = C.build_mclip(self.preset, len(self.mclip_tokenizer()))
        model.load_state_dict(_sub(self.weights("mclip"), "mclip"))
        return model.eval().requires_grad_(False)

    def clip_embeds(self) -> dict[str, torch.Tensor]:
        """``image`` (N, D) embeddings of the training set, ``zero`` (1, D), ``mean`` and ``std`` (1, D)."""
        self.require("clip")
        return load_file(str(self.root / "clip" / "embeds.safetensors"))

    def movq_model(self) -> Any:
        model = C.build_movq(self.preset)
        model.load_state_dict(_sub(self.weights("movq"), "movq"))
        return model.eval().requires_grad_(False)

    def latents(self) -> torch.Tensor:
        self.require("movq")
        return load_file(str(self.root / "movq" / "latents.safetensors"))["latents"]


def _sub(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
