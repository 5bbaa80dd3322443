"""Stage "prior": the diffusion prior from CLIP text to CLIP image embeddings.

As Kandinsky 2.1's prior: x0-prediction with the MSE loss in *normalised* CLIP image space ((e - mean) / std
with the statistics of the training set, stored in ``clip_mean`` / ``clip_std``), the squared-cosine
schedule over 1000 steps, conditioned on the CLIP text embedding, the text token states and the padding
mask; the caption is replaced by "" with probability 0.1 so that classifier-free guidance works.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..diffusion.schedules import prior_schedule
from ..models.prior import PriorTransformer
from ..models.text_encoders import clip_text_features
from . import config as C
from . import data as D
from .common import StageClock, Trainer, save_tensors
from .workspace import Workspace

TEXT_DROP = 0.1


def train(ws: Workspace) -> dict:
    clock = StageClock()
    p, sched = ws.preset, ws.preset.schedule("prior")
    ds, tok = ws.data(), ws.clip_tokenizer()
    clip_text, _ = ws.clip_models()
    emb = ws.clip_embeds()
    target = (emb["image"] - emb["mean"]) / emb["std"]
    schedule = prior_schedule()
    torch.manual_seed(ws.seed + 3)
    prior = C.build_prior(p)
    with torch.no_grad():
        prior.clip_mean.copy_(emb["mean"])
        prior.clip_std.copy_(emb["std"])
    trainer = Trainer("prior", ws.dir("prior"), {"prior": prior}, steps=sched.steps, lr=sched.lr,
                      warmup=sched.warmup, seed=ws.seed + 3, ema=("prior",), ema_decay=0.995,
                      weight_decay=0.01, progress=ws.progress)

    def step(i: int, gen: torch.Generator, rng: random.Random) -> dict[str, torch.Tensor]:
        idx = D.sample_indices(len(ds), sched.batch, gen)
        caps = D.captions_for([ds.scenes[j] for j in idx.tolist()], rng, drop=TEXT_DROP)
        with torch.no_grad():
            enc = tok(caps, padding="max_length", truncation=True, max_length=p.clip_max_len, return_tensors="pt")
            text_embeds, hidden = clip_text_features(clip_text, enc.input_ids)
        x0 = target[idx]
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=gen)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        pred = prior(x_t, t, text_embeds, hidden, enc.attention_mask)
        return {"loss": F.mse_loss(pred, x0)}

    trainer.run(step)
    save_tensors({f"prior.{k}": v for k, v in trainer.final_state("prior").items()},
                 ws.dir("prior") / "final.safetensors")
    info = clock.record(trainer)
    ws.mark_done("prior", info)
    return info


def load_prior(ws: Workspace) -> PriorTransformer:
    model = C.build_prior(ws.preset)
    w = ws.weights("prior")
    model.load_state_dict({k[len("prior."):]: v for k, v in w.items()})
    return model.eval().requires_grad_(False)
