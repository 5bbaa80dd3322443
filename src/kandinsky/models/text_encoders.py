"""Text and image encoders: M-CLIP (XLM-R + linear head) for the decoder, CLIP ViT-L/14 towers for the prior.

The transformer bodies are transformers' model classes; what is Kandinsky-specific (the M-CLIP pooling head,
which outputs are used) lives here. Builders take the ``config.json`` mapping of the component.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    XLMRobertaConfig,
    XLMRobertaModel,
)

_HF_META_KEYS = ("architectures", "_name_or_path", "transformers_version", "model_type", "torch_dtype", "dtype")


def _clean(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _HF_META_KEYS}


class MultilingualCLIP(nn.Module):
    """M-CLIP: XLM-RoBERTa whose masked-mean hidden state is projected into CLIP text space.

    ``forward`` returns ``(pooled (B, out_dim), hidden (B, L, hidden))``; pad positions keep their hidden states.
    """

    def __init__(self, config: XLMRobertaConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.transformer = XLMRobertaModel(config, add_pooling_layer=False)
        self.LinearTransformation = nn.Linear(in_dim, out_dim)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> MultilingualCLIP:
        """Build from the decoder folder's ``text_encoder/config.json`` (an MCLIPConfig)."""
        cfg = dict(config)
        in_dim = cfg.pop("transformerDimensions", cfg.pop("transformerDimSize", cfg.get("hidden_size", 1024)))
        out_dim = cfg.pop("numDims", cfg.pop("imageDimSize", 768))
        xcfg = XLMRobertaConfig(**_clean(cfg))
        xcfg._attn_implementation = "sdpa"
        if in_dim != xcfg.hidden_size:
            raise ValueError(f"text_encoder config: transformerDimensions={in_dim} but hidden_size={xcfg.hidden_size}")
        return cls(xcfg, in_dim, out_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]
        pooled = (hidden * attention_mask.unsqueeze(2)).sum(dim=1) / attention_mask.sum(dim=1)[:, None]
        return self.LinearTransformation(pooled), hidden


def build_clip_text(config: dict[str, Any]) -> CLIPTextModelWithProjection:
    """CLIP text tower with projection, from the prior folder's ``text_encoder/config.json``."""
    cfg = CLIPTextConfig(**_clean(config))
    cfg._attn_implementation = "sdpa"
    return CLIPTextModelWithProjection(cfg)


def build_clip_vision(config: dict[str, Any]) -> CLIPVisionModelWithProjection:
    """CLIP vision tower with projection, from the prior folder's ``image_encoder/config.json``."""
    cfg = CLIPVisionConfig(**_clean(config))
    cfg._attn_implementation = "sdpa"
    return CLIPVisionModelWithProjection(cfg)


def clip_text_features(model: CLIPTextModelWithProjection,
                       input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_embeds (B, D), last_hidden_state (B, 77, W))``; no padding mask, as both upstreams call it."""
    out = model(input_ids)
    return out.text_embeds, out.last_hidden_state


def clip_image_embeds(model: CLIPVisionModelWithProjection, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (not normalised) CLIP image embedding of normalised pixel values (B, 3, S, S)."""
    return model(pixel_values=pixel_values).image_embeds
