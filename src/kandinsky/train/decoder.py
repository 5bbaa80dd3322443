"""Stages "decoder" and "inpaint": the unCLIP decoder UNet on MoVQ latents.

The UNet is conditioned, as Kandinsky 2.1's, on the CLIP image embedding of the *same* training image and
on the M-CLIP pooled embedding and token states of its caption (padded to 77 tokens, as the pipeline does).
Epsilon-prediction on the linear 0.00085-0.012 schedule with the learned-range variance (``losses``).
Condition dropout makes classifier-free guidance work as the pipeline applies it: the caption becomes ""
with probability 0.5 and the image embedding becomes the zero-image embedding with probability 0.15, so the
unconditional branch (zero-image embedding + "") is seen too.

Image mixing: the pipeline's ``mix`` decodes a weighted sum of CLIP image embeddings. A small CLIP is not
additive (the embedding of a picture with a red circle and a blue square is not the mean of the embeddings of
each alone), so a decoder trained only on real embeddings turns such a mean into a blend (a purple rounded
object). So, for a share of the two-object scenes, the condition is a random convex mix (weights 0.3-0.7) of
the embeddings of each of its objects drawn alone (at its place, or big and centred) and the caption is "" as
under ``mix``: the decoder learns that a mix of two images' embeddings means a picture with both.

The training noise has a per-channel constant "offset" (std 0.3) on top of the i.i.d. Gaussian. Without it a
small model reads the picture's colours off the mean of x_t, which at high noise is mostly the mean of the
noise, instead of off the conditioning: sampling from pure noise then gives random background colours.

The inpainting UNet starts from the decoder (``conv_in`` widened to 9 input channels, the new ones zero) and
learns to fill holes: its input is [x_t, masked image latent, keep mask] with keep = 1 where the image stays.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..diffusion.schedules import decoder_schedule
from ..models.unet import DecoderUNet
from . import config as C
from . import data as D
from . import shapes
from .clip import embed_images
from .common import StageClock, Trainer, save_tensors
from .losses import hybrid_loss
from .workspace import Workspace

TEXT_DROP = 0.5
IMAGE_DROP = 0.15
# The inpainting UNet sees the zero-image embedding half of the time: the full image's embedding already tells it
# the background and the objects, and without this it learns to ignore the kept part of the image.
INPAINT_IMAGE_DROP = 0.5
OFFSET_NOISE = 0.3
MIX_AUG = 0.4  # share of the two-object scenes conditioned on a mix of their objects' embeddings


class Conditioner:
    """Turns (scene indices, rng) into UNet conditioning, with condition dropout and mixing augmentation."""

    def __init__(self, ws: Workspace, image_drop: float = IMAGE_DROP, mix_aug: float = 0.0) -> None:
        self.ds = ws.data()
        self.image_drop, self.mix_aug = image_drop, mix_aug
        self.tok = ws.mclip_tokenizer()
        self.mclip = ws.mclip_model()
        emb = ws.clip_embeds()
        self.image, self.zero = emb["image"], emb["zero"]
        self.parts = object_embeds(ws, self.ds) if mix_aug > 0 else {}

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, gen: torch.Generator, rng: random.Random
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scenes = [self.ds.scenes[j] for j in idx.tolist()]
        mixed = [j in self.parts and rng.random() < self.mix_aug for j in idx.tolist()]
        caps = D.captions_for(scenes, rng, drop=TEXT_DROP)
        caps = ["" if m else c for c, m in zip(caps, mixed, strict=True)]
        enc = self.tok(caps, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        pooled, hidden = self.mclip(enc.input_ids, enc.attention_mask)
        image = self.image[idx].clone()
        for row, (j, m) in enumerate(zip(idx.tolist(), mixed, strict=True)):
            if m:
                w = rng.uniform(0.3, 0.7)
                a, b = self.parts[j]
                image[row] = w * a + (1 - w) * b
        drop = torch.rand(len(idx), 1, generator=gen) < self.image_drop
        return torch.where(drop, self.zero, image), pooled, hidden


@torch.no_grad()
def object_embeds(ws: Workspace, ds: D.ShapesData, centred: float = 0.5) -> dict[int, torch.Tensor]:
    """For each two-object training scene, the CLIP image embeddings (2, D) of each of its objects drawn alone on
    the scene's background: at its own place and size, or (with probability ``centred``, seeded) big and centred."""
    rng = random.Random(ws.seed + 77)
    index, singles = [], []
    for j, scene in enumerate(ds.scenes):
        if len(scene.objects) != 2:
            continue
        index.append(j)
        for obj, rgb in zip(scene.objects, scene.rgb[1:], strict=True):
            if rng.random() < centred:
                big = shapes.make_scene(obj.shape, obj.color, scene.background, "big", "center", rng)
                obj = big.objects[0]
            singles.append(shapes.Scene(scene.background, (obj,), (scene.rgb[0], rgb)))
    if not index:
        return {}
    _, vision = ws.clip_models()
    embeds = embed_images(vision, np.stack([shapes.render(s, ws.preset.image_size) for s in singles]))
    return dict(zip(index, embeds.view(len(index), 2, -1), strict=True))


def _train_unet(ws: Workspace, stage: str, unet: DecoderUNet, masks: bool) -> dict:
    clock = StageClock()
    sched = ws.preset.schedule(stage)
    cond_fn = Conditioner(ws, INPAINT_IMAGE_DROP if masks else IMAGE_DROP, mix_aug=0.0 if masks else MIX_AUG)
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
