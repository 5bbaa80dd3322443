"""Stage "movq": the MoVQ autoencoder (reconstruction + codebook and commitment losses).

Half of each batch is decoded from the quantised latent (straight-through), half from the continuous one,
which is what the decoder UNet produces at inference (the pipelines never quantise). Codes unused for a
while are restarted on random encoder outputs. Training uses random crops (the model is convolutional, with
attention only at the lowest level). Afterwards the latent is normalised to zero mean and unit variance per
channel by folding an affine map into the 1x1 convolutions around it, so the diffusion model sees
unit-scale latents while the pipeline applies no scaling factor, exactly as Kandinsky 2.1.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..models.movq import MoVQ, SpatialNorm
from . import config as C
from . import data as D
from .common import StageClock, Trainer, save_tensors
from .workspace import Workspace

RESTART_EVERY = 50


@torch.no_grad()
def fold_latent_norm(movq: MoVQ, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make ``encode`` return (z - mean) / std per channel without changing ``decode(encode(x))``."""
    mean, std = mean.flatten(), std.flatten()
    q = movq.quant_conv
    q.weight.div_(std.view(-1, 1, 1, 1))
    q.bias.sub_(mean).div_(std)
    consumers = [movq.post_quant_conv] + [c for m in movq.decoder.modules() if isinstance(m, SpatialNorm)
                                          for c in (m.conv_y, m.conv_b)]
    for conv in consumers:  # conv(z) = W (std z' + mean) + b
        w = conv.weight
        conv.bias.add_((w[:, :, 0, 0] * mean).sum(1))
        w.mul_(std.view(1, -1, 1, 1))
    movq.quantize.embedding.weight.sub_(mean).div_(std)


def random_crop(x: torch.Tensor, size: int, align: int, gen: torch.Generator) -> torch.Tensor:
    """One random ``size`` crop per image, offsets multiples of ``align`` (latent-grid aligned)."""
    if size >= x.shape[-1]:
        return x
    n = (x.shape[-1] - size) // align + 1
    offs = torch.randint(0, n, (x.shape[0], 2), generator=gen) * align
    return torch.stack([img[:, oy: oy + size, ox: ox + size] for img, (oy, ox) in zip(x, offs.tolist(),
                                                                                       strict=True)])


def train(ws: Workspace) -> dict:
    clock = StageClock()
    p, sched = ws.preset, ws.preset.schedule("movq")
    ds = ws.data()
    torch.manual_seed(ws.seed + 2)
    movq = C.build_movq(p)
    factor = movq.config.downscale_factor
    crop = max(p.image_size // 2, 8 * factor)
    trainer = Trainer("movq", ws.dir("movq"), {"movq": movq}, steps=sched.steps, lr=sched.lr,
                      warmup=sched.warmup, seed=ws.seed + 2, progress=ws.progress)
    usage = torch.zeros(movq.config.num_vq_embeddings)

    def step(i: int, gen: torch.Generator, rng: random.Random) -> dict[str, torch.Tensor]:
        idx = D.sample_indices(len(ds), sched.batch, gen)
        x = random_crop(D.to_model_range(ds.images[idx.numpy()]), crop, factor, gen)
        z = movq.encode(x)
        q = movq.quantize(z)
        use_q = (torch.rand(x.shape[0], 1, 1, 1, generator=gen) < 0.5).to(z.dtype)
        y = movq.decode(use_q * q.z_q + (1 - use_q) * z)
        rec = F.l1_loss(y, x) + F.mse_loss(y, x)
        usage.add_(torch.bincount(q.indices.flatten(), minlength=usage.numel()).float())
        if (i + 1) % RESTART_EVERY == 0:
            _restart_codes(movq, usage, z.detach(), gen)
            usage.zero_()
        return {"loss": rec + q.codebook_loss + 0.25 * q.commitment_loss, "reconstruction": rec.detach(),
                "codebook": q.codebook_loss.detach()}

    trainer.run(step)
    movq.load_state_dict(trainer.final_state("movq"))
    movq.eval()
    latents = encode_all(movq, ds)
    mean = latents.mean((0, 2, 3), keepdim=True)
    std = latents.std((0, 2, 3), keepdim=True)
    fold_latent_norm(movq, mean, std)
    latents = (latents - mean) / std
    save_tensors({f"movq.{k}": v for k, v in movq.state_dict().items()}, ws.dir("movq") / "final.safetensors")
    save_tensors({"latents": latents}, ws.dir("movq") / "latents.safetensors")
    info = clock.record(trainer, **evaluate(movq, ds))
    ws.mark_done("movq", info)
    return info


@torch.no_grad()
def _restart_codes(movq: MoVQ, usage: torch.Tensor, z: torch.Tensor, gen: torch.Generator) -> None:
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=gen)
    movq.quantize.embedding.weight[dead] = flat[pick]


@torch.no_grad()
def encode_all(movq: MoVQ, ds: D.ShapesData, batch: int = 256) -> torch.Tensor:
    return torch.cat([movq.encode(D.to_model_range(ds.images[i: i + batch])) for i in range(0, len(ds), batch)])


@torch.no_grad()
def evaluate(movq: MoVQ, ds: D.ShapesData, n: int = 128) -> dict:
    """PSNR (dB) of continuous and quantised reconstructions, and the latent's std, on training images."""
    x = D.to_model_range(ds.images[:n])
    z = movq.encode(x)
    out = {}
    for name, latent in (("psnr", z), ("psnr_quantized", movq.quantize(z).z_q)):
        mse = F.mse_loss(movq.decode(latent).clamp(-1, 1), x)
        out[name] = float(10 * torch.log10(4 / mse))
    out["latent_std"] = float(z.std())
    return out
