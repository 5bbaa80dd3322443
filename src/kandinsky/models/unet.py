"""The Kandinsky 2.1 decoder UNet (1.23 B parameters; the inpainting variant differs only in ``conv_in``).

A ResNet UNet whose resampling is done by ResBlocks (avg-pool / nearest), with scale-shift time conditioning
and "added-KV" attention: each attention layer attends over the 87 context tokens (10 image tokens, then 77
text tokens) *and* the spatial tokens, with separate key/value projections for each. Module and parameter
names follow diffusers' ``UNet2DConditionModel`` so its state dict loads with ``strict=True``.

Everything that depends on neither the timestep nor the latent (the added time embedding, the context tokens,
the context keys/values of every attention layer) is computed once per sampling call by ``prepare_condition``.
CPU inference runs channels-last through oneDNN (prepacked conv weights, fused bias/residual adds) where
``fastpath`` found the kernels for the dtype on this CPU; whenever autograd is needed, off CPU, or without those
kernels, the layers are plain PyTorch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kandinsky.models.common import config_value, page_out, timestep_embedding
from kandinsky.models.fastpath import Conv2d, Linear, cat_channels

_DOWN_FIRST, _DOWN_REST = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
_UP_LAST, _UP_REST = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"
_MID = "UNetMidBlock2DSimpleCrossAttn"
_NUM_IMAGE_TOKENS = 10  # fixed in diffusers' TextImageProjection
_SIZE_DEFAULTS = {"norm_num_groups": 32, "norm_eps": 1e-5, "dropout": 0.0}

# diffusers UNet2DConditionModel options: (diffusers' default, the values Kandinsky 2.1 allows). A missing key
# takes diffusers' default, so a config without e.g. ``addition_embed_type`` is rejected (it is another model).
_FIXED: dict[str, tuple[Any, list[Any]]] = {
    "act_fn": ("silu", ["silu"]),
    "addition_embed_type": (None, ["text_image"]),
    "addition_embed_type_num_heads": (64, [64]),
    "addition_time_embed_dim": (None, [None]),
    "attention_type": ("default", ["default"]),
    "center_input_sample": (False, [False]),
    "class_embed_type": (None, [None]),
    "class_embeddings_concat": (False, [False]),
    "conv_in_kernel": (3, [3]),
    "conv_out_kernel": (3, [3]),
    "cross_attention_norm": (None, [None]),
    "downsample_padding": (1, [1]),
    "dual_cross_attention": (False, [False]),
    "encoder_hid_dim_type": (None, ["text_image_proj"]),
    "flip_sin_to_cos": (True, [True]),
    "freq_shift": (0, [0]),
    "mid_block_only_cross_attention": (None, [None, False]),
    "mid_block_scale_factor": (1, [1]),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", [_MID]),
    "num_attention_heads": (None, [None]),
    "num_class_embeds": (None, [None]),
    "only_cross_attention": (False, [False]),
    "resnet_out_scale_factor": (1.0, [1.0]),
    "resnet_skip_time_act": (False, [False]),
    "resnet_time_scale_shift": ("default", ["scale_shift"]),
    "reverse_transformer_layers_per_block": (None, [None]),
    "time_cond_proj_dim": (None, [None]),
    "time_embedding_act_fn": (None, [None]),
    "time_embedding_dim": (None, [None]),
    "time_embedding_type": ("positional", ["positional"]),
    "timestep_post_act": (None, [None]),
    "transformer_layers_per_block": (1, [1]),
    "upcast_attention": (False, [False]),
    "use_linear_projection": (False, [False]),
}


@dataclass
class UNetConfig:
    """Sizes of the decoder UNet; defaults are the published Kandinsky 2.1 ``unet/config.json``."""

    in_channels: int = 4  # 9 for inpainting: [x_t, masked image latent, mask]
    out_channels: int = 8  # epsilon (4) + learned-variance interpolation (4)
    block_out_channels: tuple[int, ...] = (384, 768, 1152, 1536)
    layers_per_block: int = 3
    attention_head_dim: int = 64
    cross_attention_dim: int = 768  # context width; also the CLIP image / pooled text embedding width
    encoder_hid_dim: int = 1024  # M-CLIP per-token hidden width
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if len(self.block_out_channels) < 2:
            raise ValueError("unet config: block_out_channels needs at least 2 levels")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"unet config: norm_num_groups={self.norm_num_groups} does not divide "
                                 f"block_out_channels entry {c}")
            if c % self.attention_head_dim:
                raise ValueError(f"unet config: attention_head_dim={self.attention_head_dim} does not divide "
                                 f"block_out_channels entry {c}")
        if self.layers_per_block < 1:
            raise ValueError(f"unet config: layers_per_block={self.layers_per_block} must be >= 1")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """Read a diffusers ``unet/config.json`` mapping; options Kandinsky 2.1 does not use raise ValueError.

        Sizes are required (a missing or null one raises), except ``norm_num_groups`` (32), ``norm_eps`` (1e-5)
        and ``dropout`` (0), where diffusers' defaults are the published values.
        """
        for key, (default, allowed) in _FIXED.items():
            config_value(d, key, default, allowed, component="unet")
        sizes: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in _SIZE_DEFAULTS:  # diffusers' defaults, which are also Kandinsky's
                value = config_value(d, f.name, _SIZE_DEFAULTS[f.name], component="unet")
            else:
                value = config_value(d, f.name, component="unet")
            if f.name == "block_out_channels":
                ok = isinstance(value, (list, tuple)) and all(isinstance(c, int) and c > 0 for c in value)
            elif f.name in ("norm_eps", "dropout"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            if not ok:
                raise ValueError(f"unet config has {f.name}={value!r}; Kandinsky 2.1 needs "
                                 + ("a list of channel counts" if f.name == "block_out_channels"
                                    else "one number (per-block lists are not supported)"))
            sizes[f.name] = value
        n = len(sizes["block_out_channels"])
        expected = {"down_block_types": [_DOWN_FIRST] + [_DOWN_REST] * (n - 1),
                    "up_block_types": [_UP_REST] * (n - 1) + [_UP_LAST]}
        for key, want in expected.items():
            got = d.get(key)
            if not isinstance(got, (list, tuple)) or list(got) != want:
                raise ValueError(f"unet config has {key}={got!r}; Kandinsky 2.1 with {n} levels uses {want}")
        return cls(**sizes)


@dataclass
class UNetCondition:
    """Step-invariant conditioning of one sampling call (see ``DecoderUNet.prepare_condition``).

    ``emb_add`` (B, time_embed_dim) is added to the timestep embedding; ``context`` (B, 10 + 77, cross_dim)
    holds the image tokens then the text tokens; ``kv`` caches every attention layer's context keys and
    values (each (B, 87, channels), in forward order), or is None to project them at every step.
    """

    emb_add: torch.Tensor
    context: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def rows(self, index: slice) -> UNetCondition:
        """The condition of a subset of the batch rows (e.g. the conditional half under guidance), as views."""
        kv = None if self.kv is None else [(k[index], v[index]) for k, v in self.kv]
        return UNetCondition(emb_add=self.emb_add[index], context=self.context[index], kv=kv)


class DeepCache:
    """Reuse of the deep UNet features across adjacent steps (DeepCache, Ma et al. 2023).

    Every ``interval``-th call (and the first) runs the whole UNet and keeps the input of the up path's
    ``depth`` shallowest levels; the calls in between run only the ``depth`` shallowest levels of the down and
    up paths and take the deep part from that cache. ``interval`` 1 is a full UNet every call. Use one object
    per sampling call.
    """

    def __init__(self, interval: int = 2, depth: int = 1) -> None:
        if interval < 1 or depth < 1:
            raise ValueError(f"DeepCache needs interval >= 1 and depth >= 1, got {interval}, {depth}")
        self.interval, self.depth = int(interval), int(depth)
        self.calls = 0
        self.feature: torch.Tensor | None = None

    def next_is_full(self) -> bool:
        return self.feature is None or self.calls % self.interval == 0


# -- layers ------------------------------------------------------------------------------------------------


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when autograd does not need the input."""
    return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


class ResBlock(nn.Module):
    """Scale-shift ResBlock; ``resample`` "down" (avg-pool 2) or "up" (nearest x2) applies after GN1 + SiLU.

    ``emb`` is SiLU(time embedding), shared by all blocks (diffusers applies the SiLU inside each block).
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, eps: float,
                 resample: str | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.resample = resample
        self.dropout = dropout
        self.norm1 = nn.GroupNorm(groups, cin, eps)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = Linear(temb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = _silu(self.norm1(x))
        x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)
        scale, shift = self.time_emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = _silu(torch.addcmul(shift, self.norm2(h), 1 + scale))
        if self.dropout:
            h = F.dropout(h, self.dropout, self.training)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return self.conv2(h, add=skip)


class Attention(nn.Module):
    """Added-KV attention: spatial queries attend over [context tokens ; spatial tokens], plus a residual."""

    def __init__(self, channels: int, head_dim: int, cross_dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.heads, self.head_dim = channels // head_dim, head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.add_k_proj = Linear(cross_dim, channels)
        self.add_v_proj = Linear(cross_dim, channels)
        self.to_out = nn.ModuleList([Linear(channels, channels)])

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, heads, L, head_dim), a view."""
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the context tokens, each (B, L_ctx, C)."""
        return self.add_k_proj(context), self.add_v_proj(context)

    def forward(self, x: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, HW, C): views when x is channels-last
        tokens = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        residual = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        q = self._heads(self.to_q(tokens))
        k = self._heads(torch.cat([k_ctx, self.to_k(tokens)], dim=1))
        v = self._heads(torch.cat([v_ctx, self.to_v(tokens)], dim=1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        out = self.to_out[0](out, add=residual).view(b, h, w, c).permute(0, 3, 1, 2)  # channels-last
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


class Stage(nn.Module):
    """One resolution level: ResBlocks (each optionally followed by attention) and an optional resampler."""

    def __init__(self, resnets: list[ResBlock], attentions: list[Attention], sampler: ResBlock | None,
                 sampler_name: str) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.resnets = nn.ModuleList(resnets)
        setattr(self, sampler_name, nn.ModuleList([sampler]) if sampler is not None else None)


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, temb_dim: int, cfg: UNetConfig) -> None:
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.attentions = nn.ModuleList([Attention(channels, cfg.attention_head_dim, cfg.cross_attention_dim,
                                                   g, eps)])
        self.resnets = nn.ModuleList([ResBlock(channels, channels, temb_dim, g, eps, dropout=cfg.dropout)
                                      for _ in range(2)])


class TextImageProjection(nn.Module):
    """Context tokens: the image embedding as 10 tokens, then the projected text hidden states."""

    def __init__(self, text_dim: int, image_dim: int, cross_dim: int) -> None:
        super().__init__()
        self.image_embeds = Linear(image_dim, _NUM_IMAGE_TOKENS * cross_dim)
        self.text_proj = Linear(text_dim, cross_dim)

    def forward(self, text_hidden_states: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        image_tokens = self.image_embeds(image_embeds).unflatten(-1, (_NUM_IMAGE_TOKENS, -1))
        return torch.cat([image_tokens, self.text_proj(text_hidden_states)], dim=1)


class TextImageTimeEmbedding(nn.Module):
    """Added time embedding: image_proj(image) + LayerNorm(text_proj(pooled text))."""

    def __init__(self, text_dim: int, image_dim: int, time_dim: int) -> None:
        super().__init__()
        self.text_proj = Linear(text_dim, time_dim)
        self.text_norm = nn.LayerNorm(time_dim)
        self.image_proj = Linear(image_dim, time_dim)

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.image_proj(image_embeds) + self.text_norm(self.text_proj(text_embeds))


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = Linear(cin, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# -- the UNet --------------------------------------------------------------------------------------------


class DecoderUNet(nn.Module):
    """Kandinsky 2.1 decoder UNet; state dict identical to diffusers' ``UNet2DConditionModel``.

    Latent height and width must be divisible by 2 ** (levels - 1) (8 for the published model).
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or UNetConfig()
        chans, n, tdim = cfg.block_out_channels, len(cfg.block_out_channels), cfg.time_embed_dim
        g, eps, hd, xd, p = (cfg.norm_num_groups, cfg.norm_eps, cfg.attention_head_dim, cfg.cross_attention_dim,
                             cfg.dropout)
        self.gradient_checkpointing = False
        self.channels_last: bool | None = None  # None: channels-last on CPU, contiguous elsewhere
        self._compiled: Any = None
        self._cuda_graphs = False

        self.conv_in = Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], tdim)
        self.encoder_hid_proj = TextImageProjection(cfg.encoder_hid_dim, xd, xd)
        self.add_embedding = TextImageTimeEmbedding(xd, xd, tdim)

        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # registered here to keep diffusers' state-dict order
        for i, cout in enumerate(chans):
            cin = chans[max(i - 1, 0)]
            resnets = [ResBlock(cin if j == 0 else cout, cout, tdim, g, eps, dropout=p)
                       for j in range(cfg.layers_per_block)]
            attns = [Attention(cout, hd, xd, g, eps) for _ in resnets] if i > 0 else []
            down = ResBlock(cout, cout, tdim, g, eps, "down", p) if i < n - 1 else None
            self.down_blocks.append(Stage(resnets, attns, down, "downsamplers"))

        self.mid_block = MidBlock(chans[-1], tdim, cfg)

        rev = list(reversed(chans))
        for i, cout in enumerate(rev):
            prev = rev[max(i - 1, 0)]  # channels coming from below
            skip_last = rev[min(i + 1, n - 1)]  # the level's first skip comes from the level above
            resnets = []
            for j in range(cfg.layers_per_block + 1):
                cin = prev if j == 0 else cout
                skip = skip_last if j == cfg.layers_per_block else cout
                resnets.append(ResBlock(cin + skip, cout, tdim, g, eps, dropout=p))
            attns = [Attention(cout, hd, xd, g, eps) for _ in resnets] if i < n - 1 else []
            up = ResBlock(cout, cout, tdim, g, eps, "up", p) if i < n - 1 else None
            self.up_blocks.append(Stage(resnets, attns, up, "upsamplers"))

        self.conv_norm_out = nn.GroupNorm(g, chans[0], eps)
        self.conv_out = Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    # -- conditioning ------------------------------------------------------------------------------------

    def attention_layers(self) -> Iterator[Attention]:
        """All attention layers, in the order ``forward`` uses them."""
        for block in self.down_blocks:
            yield from block.attentions or []
        yield from self.mid_block.attentions
        for block in self.up_blocks:
            yield from block.attentions or []

    def prepare_condition(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                          text_hidden_states: torch.Tensor, cache_kv: bool = True) -> UNetCondition:
        """Step-invariant conditioning from the CLIP image embedding (B, 768), the M-CLIP pooled text (B, 768)
        and the M-CLIP hidden states (B, 77, 1024); compute it once per sampling call.

        ``cache_kv`` also projects every attention layer's context keys/values once (2 * 87 * 25728 values per
        row for the published model, 17.9 MB in fp32), so that the steps skip those projections.
        """
        dtype = self.conv_in.weight.dtype
        image_embeds, text_embeds = image_embeds.to(dtype), text_embeds.to(dtype)
        emb_add = self.add_embedding(text_embeds, image_embeds)
        context = self.encoder_hid_proj(text_hidden_states.to(dtype), image_embeds)
        kv = [attn.context_kv(context) for attn in self.attention_layers()] if cache_kv else None
        return UNetCondition(emb_add=emb_add, context=context, kv=kv)

    # -- forward -----------------------------------------------------------------------------------------

    def _run(self, layer: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | float,
                cond: UNetCondition, cache: DeepCache | None = None) -> torch.Tensor:
        """``sample`` (B, in_channels, h, w); ``timestep`` a number, 0-d or (B,) tensor -> (B, out_channels, h, w).

        ``cond`` comes from ``prepare_condition`` with the same batch size. ``cache`` (a :class:`DeepCache`)
        skips the deep levels on the calls between its refreshes.
        """
        if self._compiled is not None and cache is None and not torch.is_grad_enabled():
            try:
                t = torch.as_tensor(timestep, device=sample.device)  # a tensor, so that steps do not recompile
                if self._cuda_graphs:  # each call is a new step; its output buffer is reused by the next replay
                    torch.compiler.cudagraph_mark_step_begin()
                    return self._compiled(sample, t, cond.emb_add, cond.context, cond.kv).clone()
                return self._compiled(sample, t, cond.emb_add, cond.context, cond.kv)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                warnings.warn(f"torch.compile of the UNet failed ({type(exc).__name__}: {exc}); running eagerly",
                              RuntimeWarning, stacklevel=2)
                self.set_compile(False)
        return self._forward(sample, timestep, cond, cache)

    def _forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | float, cond: UNetCondition,
                 cache: DeepCache | None = None) -> torch.Tensor:
        b = sample.shape[0]
        if cond.emb_add.shape[0] != b:
            raise ValueError(f"sample has batch {b} but the condition was prepared for batch "
                             f"{cond.emb_add.shape[0]}")
        dtype = self.conv_in.weight.dtype
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(dtype))
        emb = F.silu(temb + cond.emb_add)
        kv = cond.kv if cond.kv is not None else [a.context_kv(cond.context) for a in self.attention_layers()]
        n = len(self.down_blocks)
        full = cache is None or cache.next_is_full()
        depth = n if full else min(cache.depth, n)  # levels computed in this call
        # the attention layers of the levels skipped in this call are skipped in the kv list too
        per_level = [len(blk.attentions or []) for blk in self.down_blocks]
        down_kv = iter(kv[:sum(per_level)])
        up_kv = iter(kv[len(kv) - sum(len(blk.attentions or []) for blk in self.up_blocks[n - depth:]):])

        channels_last = self.channels_last if self.channels_last is not None else sample.device.type == "cpu"
        if channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(sample.to(dtype))
        skips = [h]
        for level, block in enumerate(self.down_blocks[:depth]):
            for i, res in enumerate(block.resnets):
                h = self._run(res, h, emb)
                if block.attentions is not None:
                    h = self._run(block.attentions[i], h, *next(down_kv))
                skips.append(h)
            if block.downsamplers is not None and level + 1 < depth:
                h = self._run(block.downsamplers[0], h, emb)
                skips.append(h)

        if full:
            mid = self.mid_block
            h = self._run(mid.resnets[0], h, emb)
            h = self._run(mid.attentions[0], h, *kv[sum(per_level)])
            h = self._run(mid.resnets[1], h, emb)
        else:
            h = cache.feature
            if h.shape[0] != b:  # the cache was filled under guidance, this call is conditional only
                h = h[h.shape[0] - b:]

        for level, block in enumerate(self.up_blocks):
            if level < n - depth:
                continue
            if cache is not None and full and level == n - min(cache.depth, n):
                cache.feature = h
            for i, res in enumerate(block.resnets):
                h = self._run(res, cat_channels(h, skips.pop()), emb)
                if block.attentions is not None:
                    h = self._run(block.attentions[i], h, *next(up_kv))
            if block.upsamplers is not None:
                h = self._run(block.upsamplers[0], h, emb)
        if cache is not None:
            cache.calls += 1

        h = self.conv_out(_silu(self.conv_norm_out(h)))
        return h.contiguous()

    # -- torch.compile -----------------------------------------------------------------------------------

    def set_compile(self, enabled: bool = True, **options: Any) -> None:
        """Run inference forwards through ``torch.compile`` (off by default; ``options`` go to it, e.g.
        ``mode="reduce-overhead"`` for CUDA graphs). Compilation happens at the first call of each input shape
        (minutes for the published model on a small CPU; inductor caches the result on disk for later
        processes); if it fails, the UNet warns and runs eagerly from then on. Not used with ``DeepCache``.
        """
        if not enabled:
            self._compiled = None
            return
        self._cuda_graphs = options.get("mode") in ("reduce-overhead", "max-autotune")
        options.setdefault("dynamic", False)
        if "mode" not in options:  # constant weights: inductor folds and prepacks them (oneDNN on CPU)
            options.setdefault("options", {"freezing": True})

        def run(sample: torch.Tensor, t: torch.Tensor, emb_add: torch.Tensor, context: torch.Tensor,
                kv: list[tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
            return self._forward(sample, t, UNetCondition(emb_add=emb_add, context=context, kv=kv))

        self._compiled = torch.compile(run, **options)

    def __getstate__(self) -> dict[str, Any]:  # a compiled function does not copy or pickle
        return {**super().__getstate__(), "_compiled": None}

    # -- CPU weight packing ------------------------------------------------------------------------------

    def set_low_memory(self, enabled: bool) -> None:
        """Low-memory mode: once a conv weight is packed, the pages of its (memory-mapped) source are dropped,
        so the packed copy no longer doubles the conv weights' resident memory (see ``common.page_out``)."""
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.page_out_source = enabled

    def release_memory(self) -> None:
        """Free the packed conv weights and drop the resident pages of memory-mapped weights (until next use)."""
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.release_packed()
        page_out(self.parameters())

    def set_cpu_prepack(self, enabled: bool) -> None:
        """Turn the prepacked-weight CPU path of every conv on or off (off frees the packed copies)."""
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.prepack = enabled
                if not enabled:
                    m.release_packed()
