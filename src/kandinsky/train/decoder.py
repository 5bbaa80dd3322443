"""Stages "decoder" and "inpaint": the unCLIP decoder UNet on MoVQ latents.

The UNet is conditioned, as Kandinsky 2.1's, on the CLIP image embedding of the *same* training image and
on the M-CLIP pooled embedding and token states of its caption (padded to 77 tokens, as the pipeline does).
Epsilon-prediction on the linear 0.00085-0.012 schedule with the learned-range variance (``losses``).
Condition dropout makes classifier-free guidance work as the pipeline applies it: the caption becomes ""
with probability 0.5 and the image embedding becomes the zero-image embedding with probability 0.15, so the
unconditional branch (zero-image embedding + "") is seen too.

The training noise has a per-channel constant "offset" (std 0.3) on top of the i.i.d. Gaussian. Without it a
small model reads the picture's colours off the mean of x_t, which at high noise is mostly the mean of the
noise, instead of off the conditioning: sampling from pure noise then gives random background colours.

The inpainting UNet starts from the decoder (``conv_in`` widened to 9 input channels, the new ones zero) and
learns to fill holes: its input is [x_t, masked image latent, keep mask] with keep = 1 where the image stays.
"""

from __future__ import annotations

import random

import torch

from ..diffusion.schedules import decoder_schedule
from ..models.unet import DecoderUNet
from . import config as C
from . import data as D
from .common import StageClock, Trainer, save_tensors
from .losses import hybrid_loss
from .workspace import Workspace

TEXT_DROP = 0.5
IMAGE_DROP = 0.15
# The inpainting UNet sees the zero-image embedding half of the time: the full image's embedding already tells it
# the background and the objects, and without this it learns to ignore the kept part of the image.
INPAINT_IMAGE_DROP = 0.5
OFFSET_NOISE = 0.3


class Conditioner:
    """Turns (scene indices, rng) into UNet conditioning, with condition dropout."""

    def __init__(self, ws: Workspace, image_drop: float = IMAGE_DROP) -> None:
        self.ds = ws.data()
        self.image_drop = image_drop
        self.tok = ws.mclip_tokenizer()
        self.mclip = ws.mclip_model()
        emb = ws.clip_embeds()
        self.image, self.zero = emb["image"], emb["zero"]

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, gen: torch.Generator, rng: random.Random
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        caps = D.captions_for([self.ds.scenes[j] for j in idx.tolist()], rng, drop=TEXT_DROP)
        enc = self.tok(caps, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        pooled, hidden = self.mclip(enc.input_ids, enc.attention_mask)
        drop = torch.rand(len(idx), 1, generator=gen) < self.image_drop
        image = torch.where(drop, self.zero, self.image[idx])
        return image, pooled, hidden


def _train_unet(ws: Workspace, stage: str, unet: DecoderUNet, masks: bool) -> dict:
    clock = StageClock()
    sched = ws.preset.schedule(stage)
    cond_fn = Conditioner(ws, INPAINT_IMAGE_DROP if masks else IMAGE_DROP)
    latents = ws.latents()
    schedule = decoder_schedule()
    seed = ws.seed + (4 if stage == "decoder" else 5)
    trainer = Trainer(stage, ws.dir(stage), {"unet": unet}, steps=sched.steps, lr=sched.lr, warmup=sched.warmup,
                      seed=seed, ema=("unet",), ema_decay=0.999, progress=ws.progress)

    def step(i: int, gen: torch.Generator, rng: random.Random) -> dict[str, torch.Tensor]:
        idx = D.sample_indices(len(latents), sched.batch, gen)
        image, pooled, hidden = cond_fn(idx, gen, rng)
        z0 = latents[idx].float()
        t = torch.randint(0, schedule.num_train_timesteps, (z0.shape[0],), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        noise = noise + OFFSET_NOISE * torch.randn(*z0.shape[:2], 1, 1, generator=gen)
        x_t = schedule.add_noise(z0, noise, t)
        inp = x_t
        if masks:
            keep = random_keep_masks(z0.shape[0], z0.shape[-1], gen)
            inp = torch.cat([x_t, z0 * keep, keep], dim=1)
        out = unet(inp, t, unet.prepare_condition(image, pooled, hidden, cache_kv=False))
        mse, vlb = hybrid_loss(schedule, z0, x_t, t, noise, out)
        return {"loss": mse + vlb, "mse": mse.detach(), "vlb": vlb.detach()}

    trainer.run(step)
    save_tensors({f"unet.{k}": v for k, v in trainer.final_state("unet").items()},
                 ws.dir(stage) / "final.safetensors")
    info = clock.record(trainer)
    ws.mark_done(stage, info)
    return info


def random_keep_masks(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 1, size, size) keep masks: a quarter keep nothing, the rest have one random rectangular hole."""
    keep = torch.ones(batch, 1, size, size)
    for b in range(batch):
        if torch.rand(1, generator=gen).item() < 0.25:
            keep[b] = 0
            continue
        h, w = torch.randint(max(1, size // 4), size - size // 4 + 1, (2,), generator=gen).tolist()
        y = int(torch.randint(0, size - h + 1, (1,), generator=gen))
        x = int(torch.randint(0, size - w + 1, (1,), generator=gen))
        keep[b, :, y: y + h, x: x + w] = 0
    return keep


def train_decoder(ws: Workspace) -> dict:
    torch.manual_seed(ws.seed + 4)
    return _train_unet(ws, "decoder", C.build_unet(ws.preset), masks=False)


def train_inpaint(ws: Workspace) -> dict:
    unet = C.build_unet(ws.preset, in_channels=9)
    unet.load_state_dict(widen_conv_in(load_unet(ws, "decoder").state_dict(), 9))
    return _train_unet(ws, "inpaint", unet, masks=True)


def widen_conv_in(state: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """A UNet state dict with ``conv_in`` taking ``channels`` inputs; the added input channels start at zero."""
    state = dict(state)
    w = state["conv_in.weight"]
    wide = torch.zeros(w.shape[0], channels, *w.shape[2:], dtype=w.dtype)
    wide[:, : w.shape[1]] = w
    state["conv_in.weight"] = wide
    return state


def load_unet(ws: Workspace, stage: str) -> DecoderUNet:
    unet = C.build_unet(ws.preset, in_channels=4 if stage == "decoder" else 9)
    w = ws.weights(stage)
    unet.load_state_dict({k[len("unet."):]: v for k, v in w.items()})
    return unet.eval().requires_grad_(False)
