"""MoVQ: the VQGAN-style image autoencoder of Kandinsky 2.1 (f = 8, 4 latent channels).

The decoder uses SpatialNorm (MoVQ, arXiv 2209.09002): every normalisation is modulated by the latent itself.
Module and parameter names follow diffusers' ``VQModel`` so its state dict loads with ``strict=True``.
At inference the codebook is skipped in both directions (``encode`` is continuous, ``decode`` takes the
continuous latent), as in both upstreams; ``quantize`` is there for training.

CPU inference takes a fast route with the same results (within float rounding): channels-last activations,
oneDNN convolutions with the residual add fused (``fastpath``; each packed weight freed right after its one
use), every norm as its statistics (the sums of x and x²) then one multiply-add that applies the norm and, for
SpatialNorm, the latent's modulation, then an in-place SiLU, into reused buffers; the modulation computed at the
latent's resolution and broadcast over each latent cell's pixels (a 1x1 conv commutes with nearest upsampling,
so ``zq`` is never upsampled); and each "nearest x2 then 3x3 conv" upsampler as the equivalent stride-2 4x4
transposed conv (16 instead of 36 multiply-adds per input pixel and channel pair, and no upsampled map).
Autograd, other devices and ``KANDINSKY_FAST_PATHS=0`` take the plain route, diffusers' operations one by one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.models import fastpath
from kandinsky.models.common import config_value
from kandinsky.models.fastpath import Conv2d, Linear

_DOWN_TYPES = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
_UP_TYPES = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")
_EPS = 1e-6


@dataclass
class MoVQConfig:
    """Architecture of the MoVQ autoencoder; defaults are the published Kandinsky 2.1 ``movq/config.json``."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3
    layers_per_block: int = 2
    norm_num_groups: int = 32  # encoder GroupNorms only; the decoder's SpatialNorms always use 32 groups
    num_vq_embeddings: int = 16384
    vq_embed_dim: int = 4
    scaling_factor: float = 0.18215  # recorded for completeness; Kandinsky never scales its latents

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        n = len(self.block_out_channels)
        for key, types, allowed in (("down_block_types", self.down_block_types, _DOWN_TYPES),
                                    ("up_block_types", self.up_block_types, _UP_TYPES)):
            if len(types) != n:
                raise ValueError(f"movq config: {key} has {len(types)} entries, block_out_channels has {n}")
            for t in types:
                if t not in allowed:
                    raise ValueError(f"movq config has {key} entry {t!r}; supported: {list(allowed)}")
        if self.vq_embed_dim != self.latent_channels:
            raise ValueError(f"movq config: vq_embed_dim={self.vq_embed_dim} must equal latent_channels="
                             f"{self.latent_channels} (SpatialNorm is conditioned on the latent)")

    @property
    def downscale_factor(self) -> int:
        """Pixel size of one latent cell (8 for the published model)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MoVQConfig:
        """Build from a diffusers ``movq/config.json`` dict, rejecting options Kandinsky 2.1 does not use."""
        c = cls()
        v = lambda key, default, allowed=None: config_value(d, key, default, allowed, component="movq")  # noqa: E731
        v("_class_name", "VQModel", ["VQModel"])
        v("norm_type", "group", ["spatial"])
        v("act_fn", "silu", ["silu"])
        v("lookup_from_codebook", False, [False])
        v("mid_block_add_attention", True, [True])
        vq_embed_dim = v("vq_embed_dim", None)
        latent_channels = v("latent_channels", c.latent_channels)
        return cls(
            in_channels=v("in_channels", c.in_channels),
            out_channels=v("out_channels", c.out_channels),
            latent_channels=latent_channels,
            block_out_channels=tuple(v("block_out_channels", c.block_out_channels)),
            down_block_types=tuple(v("down_block_types", c.down_block_types)),
            up_block_types=tuple(v("up_block_types", c.up_block_types)),
            layers_per_block=v("layers_per_block", c.layers_per_block),
            norm_num_groups=v("norm_num_groups", c.norm_num_groups),
            num_vq_embeddings=v("num_vq_embeddings", c.num_vq_embeddings),
            vq_embed_dim=latent_channels if vq_embed_dim is None else vq_embed_dim,
            scaling_factor=v("scaling_factor", c.scaling_factor),
        )


# ----------------------------------------------------------------------------------------------------------
# building blocks; each takes (x, zq), zq = the latent conditioning SpatialNorm (None in the encoder).
# ``fast(x, z)`` is the CPU inference route (see the module docstring): x channels-last, z the latent's SpatialNorm
# projections (a ``_Latent``; None in the encoder); it returns channels-last tensors.

_CL = torch.channels_last


def _use_fast(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` runs the fast route for ``x``: CPU inference with the fast paths enabled."""
    if not fastpath.enabled() or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())))


def _once(conv: Conv2d, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """A conv of the fast route, which runs once per encode or decode: the packed weight ``fastpath`` makes for
    it is freed at once, so at most one conv's copy exists at a time (copies kept for the next call would save
    their repacking, a few percent of a decode, for as much memory again as all the convs' weights)."""
    try:
        return conv(x) if add is None else conv(x, add=add)
    finally:
        conv.release_packed()


class _Latent:
    """SpatialNorm's condition on the fast route: every SpatialNorm's conv_y(zq), conv_b(zq) at the latent's
    resolution, as (B, h, w, C) views of one matmul (a 1x1 conv commutes with nearest upsampling)."""

    def __init__(self, zq: torch.Tensor, norms: list[SpatialNorm]) -> None:
        self.zq = zq
        self.dtype = torch.promote_types(zq.dtype, torch.float32)  # the modulation's precision
        weight = torch.cat([c.weight.flatten(1) for n in norms for c in (n.conv_y, n.conv_b)]).to(self.dtype)
        bias = torch.cat([c.bias for n in norms for c in (n.conv_y, n.conv_b)]).to(self.dtype)
        proj = F.linear(zq.permute(0, 2, 3, 1).to(self.dtype), weight, bias)  # (B, h, w, sum of 2C)
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        start = 0
        for n in norms:
            c = n.conv_y.out_channels
            self.views[id(n)] = proj[..., start:start + c], proj[..., start + c:start + 2 * c]
            start += 2 * c


def _norm_act(norm: nn.Module, x: torch.Tensor, z: _Latent | None, silu: bool,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(x, zq)``, then SiLU if ``silu``, for a channels-last x, in a few passes over x and one buffer.

    GroupNorm then the modulation is, per channel c and latent cell, x * A + B with A = rstd * gamma * y and
    B = (beta - mean * rstd * gamma) * y + b, where y, b = conv_y(zq), conv_b(zq) at the latent's resolution
    (1 and 0 for a plain GroupNorm). The passes: the sums of x and of x² (x² through the buffer; the group
    statistics are combined in float64), one broadcast multiply-add into the buffer (two at the latent's own
    resolution, where A and B would be as large as x), and the in-place SiLU. The buffer is ``out``
    (channels-last, x's shape, not overlapping x) or a new one. ``norm`` is a SpatialNorm (``z`` required) or a
    GroupNorm (``z`` ignored).
    """
    spatial = isinstance(norm, SpatialNorm)
    gn = norm.norm_layer if spatial else norm
    b, c, hh, ww = x.shape
    if spatial and (hh % z.zq.shape[2] or ww % z.zq.shape[3]):  # not whole latent cells: interpolate as upstream
        t = norm(x, z.zq).contiguous(memory_format=_CL)
        return F.silu(t, inplace=True) if silu else t
    xv = x.contiguous(memory_format=_CL).permute(0, 2, 3, 1)  # (B, H, W, C), contiguous
    buf = torch.empty_like(xv) if out is None else out.permute(0, 2, 3, 1)
    groups = gn.num_groups
    count = hh * ww * (c // groups)
    acc = torch.promote_types(x.dtype, torch.float32)  # the precision of the sums and of the modulation
    s1 = xv.reshape(b, hh * ww, c).sum(1, dtype=acc).double().view(b, groups, -1).sum(-1) / count
    s2 = torch.mul(xv, xv, out=buf).reshape(b, hh * ww, c).sum(1, dtype=acc)
    s2 = s2.double().view(b, groups, -1).sum(-1) / count
    rstd = ((s2 - s1 * s1).clamp_min(0) + gn.eps).rsqrt()
    scale = rstd.repeat_interleave(c // groups, dim=1)  # (B, C)
    shift = -s1.repeat_interleave(c // groups, dim=1) * scale
    if gn.affine:
        scale = scale * gn.weight.double()
        shift = torch.addcmul(gn.bias.double(), shift, gn.weight.double())
    scale, shift = scale.to(acc)[:, None, None, :], shift.to(acc)[:, None, None, :]
    if not spatial:
        torch.addcmul(shift.to(x.dtype), xv, scale.to(x.dtype), out=buf)
    elif z.views[id(norm)][0].shape[1:3] == (hh, ww):  # at the latent's resolution: two multiply-adds, no A, B
        y, bz = (t.to(x.dtype) for t in z.views[id(norm)])
        torch.addcmul(shift.to(x.dtype), xv, scale.to(x.dtype), out=buf)
        torch.addcmul(bz, buf, y, out=buf)
    else:
        y, bz = z.views[id(norm)]
        h, w = y.shape[1:3]
        a6 = (y * scale).to(x.dtype).unsqueeze(2).unsqueeze(4)  # (B, h, 1, w, 1, C)
        b6 = torch.addcmul(bz, y, shift).to(x.dtype).unsqueeze(2).unsqueeze(4)
        cell = (b, h, hh // h, w, ww // w, c)
        torch.addcmul(b6, xv.view(cell), a6, out=buf.view(cell))
    if silu:
        F.silu(buf, inplace=True)
    return buf.permute(0, 3, 1, 2)


class GroupNorm(nn.GroupNorm):
    """GroupNorm with the SpatialNorm call signature (the condition is ignored)."""

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class SpatialNorm(nn.Module):
    """GN_32(f) * conv_y(zq') + conv_b(zq'), zq' = nearest resize of the latent to f's size."""

    def __init__(self, channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(32, channels, eps=_EPS)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        if zq.shape[-2:] != x.shape[-2:]:
            zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)


def _norm(channels: int, groups: int, zq_channels: int | None) -> nn.Module:
    return SpatialNorm(channels, zq_channels) if zq_channels else GroupNorm(groups, channels, eps=_EPS)


class ResBlock(nn.Module):
    """x + conv2(SiLU(N2(conv1(SiLU(N1(x)))))), with a 1x1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int, groups: int, zq_channels: int | None):
        super().__init__()
        self.norm1 = _norm(c_in, groups, zq_channels)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups, zq_channels)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))
        h = self.conv2(F.silu(self.norm2(h, zq)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h

    def fast(self, x: torch.Tensor, z: _Latent | None) -> torch.Tensor:
        t = _norm_act(self.norm1, x, z, silu=True)
        h = _once(self.conv1, t)
        if t.shape != h.shape:
            t = None  # freed before the next buffer is made
        t = _norm_act(self.norm2, h, z, silu=True, out=t)
        del h
        return _once(self.conv2, t, add=x if self.conv_shortcut is None else _once(self.conv_shortcut, x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (scale 1/sqrt(C)), pre-norm, residual."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None):
        super().__init__()
        # diffusers names the norm after its kind; exactly one of the two exists
        self.group_norm = None if zq_channels else GroupNorm(groups, channels, eps=_EPS)
        self.spatial_norm = SpatialNorm(channels, zq_channels) if zq_channels else None
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.ModuleList([Linear(channels, channels)])

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        # GroupNorm on the (B, C, HW) view and ``out + x`` below keep diffusers' memory layouts (bit parity)
        if self.spatial_norm is not None:
            t = self.spatial_norm(x, zq).flatten(2)
        else:
            t = self.group_norm(x.flatten(2))
        t = t.transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return out.transpose(1, 2).reshape(b, c, h, w) + x

    def fast(self, x: torch.Tensor, z: _Latent | None) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.contiguous(memory_format=_CL)
        t = _norm_act(self.spatial_norm or self.group_norm, x, z, silu=False)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, c)  # views of channels-last tensors
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        del t
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        del q, k, v
        out = self.to_out[0](out, add=x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        return out.view(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        return _once(self.conv, F.pad(x, (0, 1, 0, 1)).contiguous(memory_format=_CL))


def _up_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Along ``dim`` (3 taps: -1, 0, +1), the 4 taps of the transposed conv equal to nearest x2 then this conv:
    with padding 1, output 2i gets w[-1] x[i-1] + (w[0] + w[1]) x[i] and output 2i+1 gets (w[-1] + w[0]) x[i] +
    w[1] x[i+1], which a stride-2 transposed conv computes with the kernel [w[1], w[0] + w[1], w[-1] + w[0], w[-1]]."""
    m, z, p = w.unbind(dim)
    return torch.stack([p, z + p, m + z, m], dim)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def transposed_weight(self) -> torch.Tensor:
        """The (C_in, C_out, 4, 4) kernel of the equivalent stride-2 transposed conv (summed in float32 at least)."""
        w = self.conv.weight
        w4 = _up_taps(_up_taps(w.to(torch.promote_types(w.dtype, torch.float32)), 2), 3)  # (C_out, C_in, 4, 4)
        return w4.transpose(0, 1).to(w.dtype)

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        # about 2.2x fewer multiply-adds than the conv on the upsampled map, and no upsampled map in memory
        return F.conv_transpose2d(x, self.transposed_weight(), self.conv.bias, stride=2, padding=1)


class Stage(nn.Module):
    """One resolution level: ResBlocks (each optionally followed by attention), then an optional resample."""

    def __init__(self, c_in: int, c_out: int, n_layers: int, attn: bool, resample: str | None, groups: int,
                 zq_channels: int | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(c_in if i == 0 else c_out, c_out, groups, zq_channels) for i in range(n_layers))
        self.attentions = nn.ModuleList(
            AttnBlock(c_out, groups, zq_channels) for _ in range(n_layers)) if attn else None
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(c_out)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(c_out)])
        self.resample = resample

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq)
            if self.attentions is not None:
                x = self.attentions[i](x, zq)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x

    def fast(self, x: torch.Tensor, z: _Latent | None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet.fast(x, z)
            if self.attentions is not None:
                x = self.attentions[i].fast(x, z)
        if self.resample == "down":
            x = self.downsamplers[0].fast(x)
        elif self.resample == "up":
            x = self.upsamplers[0].fast(x)
        return x


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at constant width."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(channels, channels, groups, zq_channels) for _ in range(2))
        self.attentions = nn.ModuleList([AttnBlock(channels, groups, zq_channels)])

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnets[0](x, zq)
        x = self.attentions[0](x, zq)
        return self.resnets[1](x, zq)

    def fast(self, x: torch.Tensor, z: _Latent | None) -> torch.Tensor:
        x = self.resnets[0].fast(x, z)
        x = self.attentions[0].fast(x, z)
        return self.resnets[1].fast(x, z)


class Encoder(nn.Module):
    """Image (B, in, H, W) -> features (B, latent, H/f, W/f) before ``quant_conv``."""

    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Stage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, t == "AttnDownEncoderBlock2D",
                  "down" if i < len(ch) - 1 else None, g, None)
            for i, t in enumerate(cfg.down_block_types))
        self.mid_block = MidBlock(ch[-1], g, None)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_fast(self, x):
            return self.fast(x)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        x = _once(self.conv_in, x.contiguous(memory_format=_CL))
        for block in self.down_blocks:
            x = block.fast(x, None)
        x = self.mid_block.fast(x, None)
        return _once(self.conv_out, _norm_act(self.conv_norm_out, x, None, silu=True)).contiguous()


class Decoder(nn.Module):
    """(post_quant_conv(z), z) -> image; every norm is a SpatialNorm conditioned on z."""

    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        ch, zc = tuple(reversed(cfg.block_out_channels)), cfg.latent_channels
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], 32, zc)
        self.up_blocks = nn.ModuleList(
            Stage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, t == "AttnUpDecoderBlock2D",
                  "up" if i < len(ch) - 1 else None, 32, zc)
            for i, t in enumerate(cfg.up_block_types))
        self.conv_norm_out = SpatialNorm(ch[-1], zc)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        if _use_fast(self, x):
            return self.fast(x, zq)
        x = self.mid_block(self.conv_in(x), zq)
        for block in self.up_blocks:
            x = block(x, zq)
        return self.conv_out(F.silu(self.conv_norm_out(x, zq)))

    def fast(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        z = _Latent(zq, [m for m in self.modules() if isinstance(m, SpatialNorm)])
        x = self.mid_block.fast(_once(self.conv_in, x.contiguous(memory_format=_CL)), z)
        for block in self.up_blocks:
            x = block.fast(x, z)
        return _once(self.conv_out, _norm_act(self.conv_norm_out, x, z, silu=True)).contiguous()


# ----------------------------------------------------------------------------------------------------------
# vector quantiser (training only)


class Quantized(NamedTuple):
    """Output of ``MoVQ.quantize``.

    ``z_q`` carries straight-through gradients to ``z``; ``codebook_loss`` = mean((e - sg[z])^2) trains the
    codebook, ``commitment_loss`` = mean((sg[e] - z)^2) trains the encoder. Both are unweighted: the
    taming/diffusers ("legacy") VQ loss is ``commitment_loss + 0.25 * codebook_loss``; the VQ-VAE paper's is
    ``codebook_loss + 0.25 * commitment_loss``.
    """

    z_q: torch.Tensor  # (B, C, H, W)
    indices: torch.Tensor  # (B, H, W) int64
    codebook_loss: torch.Tensor  # scalar
    commitment_loss: torch.Tensor  # scalar


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup (Euclidean) with a straight-through estimator."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)

    def forward(self, z: torch.Tensor) -> Quantized:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        e = self.embedding.weight
        # argmin ||z - e||^2 = argmin (||e||^2 - 2 z.e); distances in fp32 whatever the model dtype
        dist = e.float().square().sum(1)[None, :] - 2.0 * flat.detach().float() @ e.float().t()
        indices = dist.argmin(1)
        z_q = self.embedding(indices).view(b, h, w, c).permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(z_q, z.detach())
        commitment_loss = F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()
        return Quantized(z_q, indices.view(b, h, w), codebook_loss, commitment_loss)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for (B, H, W) indices, as a (B, C, H, W) latent."""
        return self.embedding(indices).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------------


class MoVQ(nn.Module):
    """MoVQ autoencoder; ``state_dict`` matches diffusers ``VQModel`` key for key.

    ``encode``: x in [-1, 1] (B, 3, H, W) -> continuous latent (B, 4, H/8, W/8), neither quantised nor scaled.
    ``decode``: latent -> image in about [-1, 1] (diffusers ``force_not_quantize=True``).
    ``quantize(z)``: nearest-codebook lookup for training (see ``Quantized``).
    """

    def __init__(self, config: MoVQConfig | None = None):
        super().__init__()
        self.config = cfg = config or MoVQConfig()
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.vq_embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.num_vq_embeddings, cfg.vq_embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.vq_embed_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, in, H, W) in [-1, 1] -> latent (B, C, H/f, W/f); H, W should be multiples of f."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, h, w) -> image (B, out, h*f, w*f); z also conditions every SpatialNorm."""
        return self.decoder(self.post_quant_conv(z), z)

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """``decode`` in overlapping ``tile``×``tile`` latent tiles, blended with linear ramps over the overlap.

        Memory is bounded by one tile's decode (the full-size output aside), whatever the image size. Each tile
        normalises and attends within itself, so the result differs slightly from ``decode`` (a smooth,
        low-frequency difference; the ramps leave no seams). Latents no larger than one tile decode directly.
        """
        b, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decode(z)
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
        f = self.config.downscale_factor
        out: torch.Tensor | None = None
        total = torch.zeros(1, 1, h * f, w * f, device=z.device, dtype=torch.float32)
        for y0 in _tile_starts(h, tile, overlap):
            for x0 in _tile_starts(w, tile, overlap):
                th, tw = min(tile, h - y0), min(tile, w - x0)
                piece = self.decode(z[:, :, y0:y0 + th, x0:x0 + tw]).float()
                if out is None:
                    out = torch.zeros(b, piece.shape[1], h * f, w * f, device=z.device, dtype=torch.float32)
                ramp_y = _ramp(th * f, overlap * f, y0 > 0, y0 + th < h, z.device)
                ramp_x = _ramp(tw * f, overlap * f, x0 > 0, x0 + tw < w, z.device)
                weight = ramp_y[:, None] * ramp_x[None, :]
                region = (slice(None), slice(None), slice(y0 * f, (y0 + th) * f), slice(x0 * f, (x0 + tw) * f))
                out[region] += piece * weight
                total[region] += weight
        return (out / total).to(z.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous reconstruction ``decode(encode(x))``."""
        return self.decode(self.encode(x))


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, size) with at least ``overlap`` shared cells between neighbours."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    count = -(-(size - tile) // stride) + 1
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(n: int, overlap: int, rise: bool, fall: bool, device: torch.device) -> torch.Tensor:
    """Blend weights along one tile axis: linear from ~0 to 1 over ``overlap`` at each inner edge."""
    w = torch.ones(n, device=device)
    ramp = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
    if rise and overlap:
        w[:overlap] = ramp
    if fall and overlap:
        w[n - overlap:] = torch.minimum(w[n - overlap:], ramp.flip(0))
    return w
