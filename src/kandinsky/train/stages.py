"""The training stages in order, and ``run_stage`` which runs one (skipping it when already done)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import shapes, vocab
from .common import StageClock
from .workspace import Workspace

STAGES = ("data", "tokenizers", "clip", "mclip", "movq", "prior", "decoder", "inpaint")


def train_data(ws: Workspace) -> dict:
    clock = StageClock()
    ds = ws.data()
    info = clock.record(images=len(ds))
    ws.mark_done("data", info)
    return info


def train_tokenizers(ws: Workspace) -> dict:
    clock = StageClock()
    corpus = shapes.caption_corpus(ws.preset.corpus, ws.seed)
    folder = ws.dir("tokenizers")
    clip_tok = vocab.train_clip_tokenizer(corpus, ws.preset.clip_vocab, ws.preset.clip_max_len, folder / "clip")
    mclip_tok = vocab.train_mclip_tokenizer(corpus, ws.preset.mclip_vocab, folder / "mclip")
    info = clock.record(clip_vocab=len(clip_tok), mclip_vocab=len(mclip_tok))
    ws.mark_done("tokenizers", info)
    return info


def _stage_fn(stage: str) -> Callable[[Workspace], dict]:
    if stage == "data":
        return train_data
    if stage == "tokenizers":
        return train_tokenizers
    if stage == "clip":
        from .clip import train
    elif stage == "mclip":
        from .mclip import train
    elif stage == "movq":
        from .movq import train
    elif stage == "prior":
        from .prior import train
    elif stage in ("decoder", "inpaint"):
        from .decoder import train_decoder, train_inpaint

        train = train_decoder if stage == "decoder" else train_inpaint
    else:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    return train


def run_stage(ws: Workspace, stage: str, force: bool = False) -> dict:
    """Run ``stage`` unless it has finished before (then return its record); a stopped stage resumes."""
    info = ws.done(stage)
    if info is not None and not force:
        _say(ws, f"[{stage}] already done ({info.get('seconds', 0):.0f} s); skipping")
        return info
    _say(ws, f"[{stage}] starting")
    info = _stage_fn(stage)(ws)
    _say(ws, f"[{stage}] done in {info.get('seconds', 0):.0f} s: " +
         ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
                   if k != "seconds"))
    return info


def run_all(ws: Workspace, export_to: Path | None = None, dtype: torch.dtype | None = torch.float16
            ) -> dict[str, dict]:
    """Every stage in order, then the export; returns each stage's record (seconds, metrics)."""
    from .export import export

    records = {stage: run_stage(ws, stage) for stage in STAGES}
    export(ws, export_to, dtype)
    total = sum(r.get("seconds", 0.0) for r in records.values())
    _say(ws, "stage times: " + ", ".join(f"{s} {r.get('seconds', 0):.0f} s" for s, r in records.items())
         + f"; total {total / 60:.1f} min")
    return records


def _say(ws: Workspace, text: str) -> None:
    if ws.progress:
        print(text, file=sys.stderr, flush=True)
