"""The Kandinsky 2.1 prior: a causal transformer mapping CLIP text features to a CLIP image embedding.

Token sequence (order matters), plus a learned positional embedding:
    [77 projected text states, embedding_proj(text_embeds), time_emb(t), proj_in(x_t), prd]
Pre-LN blocks with a causal + text-padding additive mask (-10000, as diffusers); the output is read from the
last (prd) token and is x0 in *normalised* CLIP space (``denormalize`` maps it back, once, after sampling).
Parameter names follow diffusers' ``PriorTransformer`` so its state dict loads with ``strict=True``.

Fast sampling path: under the causal mask the first 78 tokens depend on neither t nor x_t, so their per-layer
K/V are computed once (``prepare_condition``) and each step (``step``) runs only the last three tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.models.common import config_value, timestep_embedding

MASK_VALUE = -10000.0  # diffusers' additive mask value (the original code uses -inf; same result in practice)
_N_EXTRA = 4  # pooled text, time, x_t, prd


@dataclass
class PriorConfig:
    """Architecture of the prior; defaults are the published Kandinsky 2.1 ``prior/config.json``."""

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768  # CLIP dim of x_t and of the text token states
    num_embeddings: int = 77  # text tokens
    additional_embeddings: int = 4
    time_embed_dim: int | None = None  # hidden width of the time MLP (None -> inner_dim)
    embedding_proj_dim: int | None = None  # width of the pooled text embedding (None -> embedding_dim)
    clip_embed_dim: int | None = None  # output / clip_mean / clip_std width (None -> embedding_dim)

    def __post_init__(self) -> None:
        if self.additional_embeddings != _N_EXTRA:
            raise ValueError(f"prior config has additional_embeddings={self.additional_embeddings}; "
                             f"Kandinsky 2.1 uses {_N_EXTRA} (pooled text, time, x_t, prd)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_tokens(self) -> int:
        return self.num_embeddings + self.additional_embeddings

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PriorConfig:
        """Build from a diffusers ``prior/config.json`` dict, rejecting options Kandinsky 2.1 does not use."""
        c = cls()
        v = lambda key, default, allowed=None: config_value(d, key, default, allowed, component="prior")  # noqa: E731
        v("_class_name", "PriorTransformer", ["PriorTransformer"])
        v("time_embed_act_fn", "silu", ["silu"])
        v("dropout", 0.0, [0.0])
        # options that diffusers allows to be None must be given explicitly as the supported value or left out
        for key, default, allowed in (("norm_in_type", None, [None]),
                                      ("embedding_proj_norm_type", None, [None]),
                                      ("encoder_hid_proj_type", "linear", ["linear"]),
                                      ("added_emb_type", "prd", ["prd"])):
            value = d.get(key, default)
            if value not in allowed:
                raise ValueError(f"prior config has {key}={value!r}, which Kandinsky 2.1 does not use; "
                                 f"supported: {allowed}")
        return cls(
            num_attention_heads=v("num_attention_heads", c.num_attention_heads),
            attention_head_dim=v("attention_head_dim", c.attention_head_dim),
            num_layers=v("num_layers", c.num_layers),
            embedding_dim=v("embedding_dim", c.embedding_dim),
            num_embeddings=v("num_embeddings", c.num_embeddings),
            additional_embeddings=v("additional_embeddings", c.additional_embeddings),
            time_embed_dim=v("time_embed_dim", None),
            embedding_proj_dim=v("embedding_proj_dim", None),
            clip_embed_dim=v("clip_embed_dim", None),
        )


@dataclass
class PriorCondition:
    """Step-invariant state from ``PriorTransformer.prepare_condition``: per-layer K/V of tokens 0..77."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each (B, heads, 78, head_dim)
    pad_mask: torch.Tensor  # (B, 1, 1, 81) additive text-padding term over all keys (extra keys 0)


# ----------------------------------------------------------------------------------------------------------


class TimestepMLP(nn.Module):
    """linear_2(SiLU(linear_1(sinusoid)))."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, hidden)
        self.linear_2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive float mask and optional prepended (cached) K/V."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the (normed) tokens x, each (B, heads, T, head_dim)."""
        return self._split(self.to_k(x)), self._split(self.to_v(x))

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, dim); mask (B, 1, T, S) additive with S = T + cached length."""
        b, t, _ = x.shape
        q = self._split(self.to_q(x))
        k, v = self.kv(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GELUProj(nn.Module):
    """GELU(erf)(proj(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # index 1 is diffusers' (parameter-free) dropout; kept so that ``net.2`` names the output projection
        self.net = nn.Sequential(GELUProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-LN transformer block: x += Attn(LN1(x)); x += FFN(LN3(x))."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, 4 * dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), mask, past)
        return x + self.ff(self.norm3(x))


# ----------------------------------------------------------------------------------------------------------


class PriorTransformer(nn.Module):
    """Kandinsky 2.1 prior; ``state_dict`` matches diffusers ``PriorTransformer`` key for key.

    ``forward(x_t, timestep, text_embeds, text_hidden_states, text_mask)`` -> predicted x0 (B, clip_dim),
    normalised CLIP space. ``prepare_condition`` + ``step`` give the same result with cached text K/V.
    """

    def __init__(self, config: PriorConfig | None = None):
        super().__init__()
        self.config = cfg = config or PriorConfig()
        dim, emb = cfg.inner_dim, cfg.embedding_dim
        clip_dim = cfg.clip_embed_dim or emb
        self.positional_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, dim))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        # CLIP image-embedding statistics; loaded with the weights, used only by ``denormalize``
        self.clip_mean = nn.Parameter(torch.zeros(1, clip_dim), requires_grad=False)
        self.clip_std = nn.Parameter(torch.ones(1, clip_dim), requires_grad=False)
        self.time_embedding = TimestepMLP(dim, cfg.time_embed_dim or dim, dim)
        self.proj_in = nn.Linear(emb, dim)
        self.embedding_proj = nn.Linear(cfg.embedding_proj_dim or emb, dim)
        self.encoder_hidden_states_proj = nn.Linear(emb, dim)
        self.transformer_blocks = nn.ModuleList(
            Block(dim, cfg.num_attention_heads, cfg.attention_head_dim) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_to_clip_embeddings = nn.Linear(dim, clip_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_in.weight.dtype

    # -- pieces ------------------------------------------------------------------------------------------

    def _pad_mask(self, text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, 1, L) additive term: MASK_VALUE on padded text keys, 0 on the extra tokens."""
        pad = (1 - text_mask.to(dtype)) * MASK_VALUE
        return F.pad(pad, (0, self.config.additional_embeddings))[:, None, None, :]

    def _causal(self, n_q: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(n_q, L) additive causal term for the last n_q query positions of the L-token sequence."""
        n = self.config.num_tokens
        return torch.full((n, n), MASK_VALUE, device=device, dtype=dtype).triu_(1)[n - n_q:]

    def _prefix_tokens(self, text_embeds: torch.Tensor, text_hidden_states: torch.Tensor) -> torch.Tensor:
        """The t/x_t-independent tokens (B, 78, dim) before the positional embedding."""
        return torch.cat([self.encoder_hidden_states_proj(text_hidden_states),
                          self.embedding_proj(text_embeds)[:, None]], dim=1)

    def _step_tokens(self, x_t: torch.Tensor, timestep: torch.Tensor | int | float) -> torch.Tensor:
        """The last three tokens (B, 3, dim): time embedding, proj_in(x_t), prd."""
        b = x_t.shape[0]
        if not torch.is_tensor(timestep):
            # like diffusers, a Python number becomes an int64 tensor (floats are truncated)
            timestep = torch.tensor([timestep], dtype=torch.long, device=x_t.device)
        t = timestep.reshape(-1).to(x_t.device).expand(b)
        t_emb = self.time_embedding(timestep_embedding(t, self.config.inner_dim).to(self.dtype))
        prd = self.prd_embedding.to(x_t.dtype).expand(b, -1, -1)
        return torch.cat([t_emb[:, None], self.proj_in(x_t)[:, None], prd], dim=1)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj_to_clip_embeddings(self.norm_out(h[:, -1]))

    # -- full forward (training, reference) ---------------------------------------------------------------

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor | int | float, text_embeds: torch.Tensor,
                text_hidden_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Predict x0 (B, clip_dim) from x_t (B, emb), t (int, 0-d or (B,)), pooled text (B, emb),
        text token states (B, 77, emb) and the tokenizer mask (B, 77) (bool or 0/1)."""
        prefix = self._prefix_tokens(text_embeds, text_hidden_states)
        h = torch.cat([prefix, self._step_tokens(x_t, timestep)], dim=1)
        h = h + self.positional_embedding.to(h.dtype)
        mask = self._pad_mask(text_mask, h.dtype) + self._causal(h.shape[1], h.device, h.dtype)
        for block in self.transformer_blocks:
            h = block(h, mask)
        return self._head(h)

    # -- cached sampling path -----------------------------------------------------------------------------

    @torch.no_grad()
    def prepare_condition(self, text_embeds: torch.Tensor, text_hidden_states: torch.Tensor,
                          text_mask: torch.Tensor) -> PriorCondition:
        """Run the 78 text tokens once (without grad) and keep every layer's K/V for ``step``.

        Use the same (e.g. CFG-doubled) batch as the ``x_t`` later given to ``step``."""
        h = self._prefix_tokens(text_embeds, text_hidden_states)
        n = h.shape[1]
        h = h + self.positional_embedding[:, :n].to(h.dtype)
        pad = self._pad_mask(text_mask, h.dtype)
        mask = pad[..., :n] + self._causal(self.config.num_tokens, h.device, h.dtype)[:n, :n]
        kv = []
        for i, block in enumerate(self.transformer_blocks):
            kv.append(block.attn1.kv(block.norm1(h)))
            if i + 1 < len(self.transformer_blocks):  # the last layer's prefix outputs are never read
                h = block(h, mask)
        return PriorCondition(kv=kv, pad_mask=pad)

    def step(self, x_t: torch.Tensor, timestep: torch.Tensor | int | float,
             cond: PriorCondition) -> torch.Tensor:
        """Same as ``forward`` for the conditioning captured in ``cond``, computing only the last 3 tokens."""
        h = self._step_tokens(x_t, timestep)
        h = h + self.positional_embedding[:, -h.shape[1]:].to(h.dtype)
        mask = cond.pad_mask.to(h.dtype) + self._causal(h.shape[1], h.device, h.dtype)
        for block, past in zip(self.transformer_blocks, cond.kv, strict=True):
            h = block(h, mask, past)
        return self._head(h)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised CLIP space -> CLIP image-embedding space: x * clip_std + clip_mean."""
        return x * self.clip_std + self.clip_mean
