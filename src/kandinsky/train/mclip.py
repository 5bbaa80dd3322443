"""Stage "mclip": the decoder's multilingual text encoder, distilled into the CLIP text space.

As M-CLIP was made: an XLM-R-style student reads a caption in English or Russian and its pooled output
(``LinearTransformation`` of the masked mean) is regressed onto the frozen CLIP text embedding of the English
caption that mentions the same attributes.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..models.text_encoders import clip_text_features
from . import config as C
from . import data as D
from . import shapes
from .common import StageClock, Trainer, save_tensors
from .workspace import Workspace


def train(ws: Workspace) -> dict:
    clock = StageClock()
    p, sched = ws.preset, ws.preset.schedule("mclip")
    ds, clip_tok, tok = ws.data(), ws.clip_tokenizer(), ws.mclip_tokenizer()
    clip_text, _ = ws.clip_models()
    torch.manual_seed(ws.seed + 1)
    model = C.build_mclip(p, len(tok))
    trainer = Trainer("mclip", ws.dir("mclip"), {"mclip": model}, steps=sched.steps, lr=sched.lr,
                      warmup=sched.warmup, seed=ws.seed + 1, progress=ws.progress)

    def step(i: int, gen: torch.Generator, rng: random.Random) -> dict[str, torch.Tensor]:
        idx = D.sample_indices(len(ds), sched.batch, gen)
        pairs = [shapes.caption_pair(ds.scenes[j], rng) for j in idx.tolist()]
        student_text = [en if rng.random() < 0.5 else ru for en, ru in pairs]
        with torch.no_grad():
            ids = clip_tok([en for en, _ in pairs], padding="longest", truncation=True,
                           max_length=p.clip_max_len, return_tensors="pt").input_ids
            target = clip_text_features(clip_text, ids)[0]
        enc = tok(student_text, padding="longest", truncation=True, max_length=77, return_tensors="pt")
        pooled, _ = model(enc.input_ids, enc.attention_mask)
        mse = F.mse_loss(pooled, target)
        cos = 1 - F.cosine_similarity(pooled, target).mean()
        return {"loss": mse + cos, "mse": mse.detach(), "cosine": cos.detach()}

    trainer.run(step)
    save_tensors({f"mclip.{k}": v for k, v in trainer.final_state("mclip").items()},
                 ws.dir("mclip") / "final.safetensors")
    model.load_state_dict(trainer.final_state("mclip"))
    info = clock.record(trainer, **evaluate(ws, model.eval(), clip_text, tok, clip_tok))
    ws.mark_done("mclip", info)
    return info


@torch.no_grad()
def evaluate(ws: Workspace, model, clip_text, tok, clip_tok, n: int = 256) -> dict:
    """Cosine similarity of M-CLIP (English and Russian) to CLIP text embeddings, on held-out pairs too."""
    rng = random.Random(ws.seed + 777)
    pairs = [shapes.caption_pair(shapes.random_scene(rng, held_out=None), rng) for _ in range(n)]
    ids = clip_tok([en for en, _ in pairs], padding="max_length", truncation=True,
                   max_length=ws.preset.clip_max_len, return_tensors="pt").input_ids
    target = clip_text_features(clip_text, ids)[0]
    out = {}
    for k, lang in enumerate(("en", "ru")):
        enc = tok([pair[k] for pair in pairs], padding="max_length", truncation=True, max_length=77,
                  return_tensors="pt")
        pooled, _ = model(enc.input_ids, enc.attention_mask)
        out[f"cosine_{lang}"] = float(F.cosine_similarity(pooled, target).mean())
    return out
