"""Stage "clip": a small CLIP (text and vision towers) trained contrastively on image-caption pairs.

Captions come from both languages, so the one text tower serves English and Russian prompts. Two additions
to the plain CLIP loss make the image embedding describe the whole picture, as the decoder needs it to:
soft targets (a caption that mentions only some attributes matches every image that has them), and linear
attribute heads on the image embedding (background, colours, shapes, colour-shape, colour-position,
shape-size), which are discarded after training.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.text_encoders import clip_image_embeds, clip_text_features
from . import config as C
from . import data as D
from . import shapes
from .common import StageClock, Trainer, save_tensors
from .shapes import Mention, Scene
from .workspace import Workspace

N_COLORS, N_SHAPES, N_POS = len(shapes.COLOR_NAMES), len(shapes.SHAPES), len(shapes.POSITION_NAMES)
# multi-hot label groups: colours, shapes, colour-shape, colour-position, shape-size, number of objects
GROUPS = (N_COLORS, N_SHAPES, N_COLORS * N_SHAPES, N_COLORS * N_POS, N_SHAPES * 2, 2)
GROUP_WEIGHTS = (1.0, 3.0, 2.0, 1.0, 2.0, 1.0)  # shape is what a small ViT learns last
N_LABELS = sum(GROUPS)


def attribute_targets(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Background class (B,) and multi-hot labels (B, N_LABELS) of the objects in each scene."""
    bg = torch.tensor([shapes.COLOR_NAMES.index(s.background) for s in scenes])
    labels = torch.zeros(len(scenes), N_LABELS)
    for i, s in enumerate(scenes):
        for o in s.objects:
            c, sh = shapes.COLOR_NAMES.index(o.color), shapes.SHAPES.index(o.shape)
            pos, size = shapes.POSITION_NAMES.index(o.position), shapes.SIZES.index(o.size)
            base = 0
            for idx, width in ((c, N_COLORS), (sh, N_SHAPES), (c * N_SHAPES + sh, N_COLORS * N_SHAPES),
                               (c * N_POS + pos, N_COLORS * N_POS), (sh * 2 + size, N_SHAPES * 2)):
                labels[i, base + idx] = 1
                base += width
        labels[i, base + len(s.objects) - 1] = 1
    return bg, labels


def _describe(scene: Scene, m: Mention) -> tuple:
    objs = sorted((o.color, o.shape, o.size if m.size else "", o.position if m.position else "")
                  for o in scene.objects)
    return tuple(objs), scene.background if m.background else ""


def match_matrix(scenes: list[Scene], mentions: list[Mention]) -> torch.Tensor:
    """(B, B) float: 1 where image i fits caption j (caption j mentions only attributes image i has)."""
    keys: dict[Mention, list[tuple]] = {}
    for m in set(mentions):
        keys[m] = [_describe(s, m) for s in scenes]
    b = len(scenes)
    out = np.zeros((b, b), dtype=np.float32)
    for j, m in enumerate(mentions):
        target = keys[m][j]
        out[:, j] = [k == target for k in keys[m]]
    return torch.from_numpy(out)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, match: torch.Tensor, logit_scale: torch.Tensor
                     ) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets spread over all matching pairs."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    i2t = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    t2i = -(match / match.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (i2t + t2i) / 2


class ClipHeads(nn.Module):
    """Training-only parameters: the temperature and the attribute heads on the image embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.background = nn.Linear(dim, N_COLORS)
        self.labels = nn.Linear(dim, N_LABELS)

    def aux_loss(self, img: torch.Tensor, bg: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Background cross-entropy plus the weighted mean BCE of each label group."""
        loss = F.cross_entropy(self.background(img), bg)
        logits = self.labels(img)
        start = 0
        for width, weight in zip(GROUPS, GROUP_WEIGHTS, strict=True):
            part = slice(start, start + width)
            loss = loss + 2 * weight * F.binary_cross_entropy_with_logits(logits[:, part], labels[:, part])
            start += width
        return loss


def clip_batch(ws: Workspace, ds: D.ShapesData, tok, idx: torch.Tensor, rng: random.Random
               ) -> tuple[list[Scene], list[Mention], torch.Tensor, torch.Tensor]:
    scenes = [ds.scenes[i] for i in idx.tolist()]
    mentions = [shapes.random_mention(rng) for _ in scenes]
    caps = [shapes.caption(s, rng, mention=m) for s, m in zip(scenes, mentions, strict=True)]
    ids = tok(caps, padding="longest", truncation=True, max_length=ws.preset.clip_max_len,
              return_tensors="pt").input_ids
    return scenes, mentions, ids, D.to_clip_input(ds.images[idx.numpy()])


def train(ws: Workspace) -> dict:
    clock = StageClock()
    p, sched = ws.preset, ws.preset.schedule("clip")
    ds, tok = ws.data(), ws.clip_tokenizer()
    torch.manual_seed(ws.seed)
    text, vision = C.build_clip(p, ws.clip_text_config())
    heads = ClipHeads(p.clip_dim)
    trainer = Trainer("clip", ws.dir("clip"), {"text": text, "vision": vision, "heads": heads},
                      steps=sched.steps, lr=sched.lr, warmup=sched.warmup, seed=ws.seed, weight_decay=0.05,
                      progress=ws.progress)

    def step(i: int, gen: torch.Generator, rng: random.Random) -> dict[str, torch.Tensor]:
        idx = D.sample_indices(len(ds), sched.batch, gen)
        scenes, mentions, ids, pixels = clip_batch(ws, ds, tok, idx, rng)
        txt = text(ids).text_embeds
        img = vision(pixel_values=pixels).image_embeds
        con = contrastive_loss(img, txt, match_matrix(scenes, mentions), heads.logit_scale)
        aux = heads.aux_loss(img, *attribute_targets(scenes))
        return {"loss": con + aux, "contrastive": con.detach(), "attributes": aux.detach()}

    trainer.run(step)
    final = {f"text.{k}": v for k, v in trainer.final_state("text").items()}
    final |= {f"vision.{k}": v for k, v in trainer.final_state("vision").items()}
    save_tensors(final, ws.dir("clip") / "final.safetensors")
    text.load_state_dict(trainer.final_state("text"))
    vision.load_state_dict(trainer.final_state("vision"))
    metrics = evaluate(ws, ds, tok, text.eval(), vision.eval())
    embed_dataset(ws, ds, vision)
    info = clock.record(trainer, **metrics)
    ws.mark_done("clip", info)
    return info


@torch.no_grad()
def embed_images(vision: nn.Module, images: np.ndarray, batch: int = 512) -> torch.Tensor:
    """CLIP image embeddings (N, D) of uint8 images (N, H, W, 3), computed in batches."""
    return torch.cat([clip_image_embeds(vision, D.to_clip_input(images[i: i + batch]))
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def embed_dataset(ws: Workspace, ds: D.ShapesData, vision: nn.Module) -> None:
    """Cache the CLIP image embeddings of the training set, the zero-image embedding and their statistics."""
    embeds = embed_images(vision, ds.images)
    size = ws.preset.image_size
    zero = clip_image_embeds(vision, torch.zeros(1, 3, size, size))
    save_tensors({"image": embeds, "zero": zero, "mean": embeds.mean(0, keepdim=True),
                  "std": embeds.std(0, keepdim=True)}, ws.dir("clip") / "embeds.safetensors")


@torch.no_grad()
def evaluate(ws: Workspace, ds: D.ShapesData, tok, text: nn.Module, vision: nn.Module, n: int = 256) -> dict:
    """Text-to-image retrieval on fresh scenes, held-out pairs included: how often the best image fits."""
    rng = random.Random(ws.seed + 12345)
    scenes = [shapes.random_scene(rng, held_out=None) for _ in range(n)]
    images = np.stack([shapes.render(s, ws.preset.image_size) for s in scenes])
    img = F.normalize(clip_image_embeds(vision, D.to_clip_input(images)), dim=-1)
    out = {}
    for lang in ("en", "ru"):
        mentions = [shapes.Mention(True, True, True)] * n
        caps = [shapes.caption(s, rng, lang, m) for s, m in zip(scenes, mentions, strict=True)]
        ids = tok(caps, padding="max_length", truncation=True, max_length=ws.preset.clip_max_len,
                  return_tensors="pt").input_ids
        txt = F.normalize(clip_text_features(text, ids)[0], dim=-1)
        best = (txt @ img.t()).argmax(1)
        match = match_matrix(scenes, mentions)
        out[f"retrieval_{lang}"] = float(match[best, torch.arange(n)].mean())
    return out
