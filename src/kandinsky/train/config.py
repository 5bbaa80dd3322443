"""Sizes and schedules of the scaled-down Kandinsky 2.1 trained here, and builders for its components.

``PRESETS["bundled"]`` is the model shipped in ``kandinsky/assets`` (54 minutes on 2 CPU cores);
``PRESETS["tiny"]`` runs every stage in seconds (tests). Every component is one of the project's model classes
(or the transformers CLIP / XLM-R classes the loader builds), configured as diffusers would write it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..models.movq import MoVQ, MoVQConfig
from ..models.prior import PriorConfig, PriorTransformer
from ..models.text_encoders import MultilingualCLIP, build_clip_text, build_clip_vision
from ..models.unet import DecoderUNet, UNetConfig

MCLIP_MAX_POSITIONS = 80  # the pipeline pads M-CLIP input to 77 tokens; XLM-R positions start at 2


@dataclass
class StageSchedule:
    """Optimisation settings of one stage."""

    steps: int
    batch: int
    lr: float
    warmup: int = 50


@dataclass
class Preset:
    """Everything that sizes a training run."""

    name: str
    n_images: int = 20000
    image_size: int = 64
    corpus: int = 20000  # scenes whose captions train the tokenizers
    clip_vocab: int = 1200
    mclip_vocab: int = 800
    # CLIP: ``clip_dim`` is the shared embedding width (prior embedding_dim = UNet cross_attention_dim)
    clip_dim: int = 128
    clip_max_len: int = 32
    clip_text_layers: int = 3
    clip_text_heads: int = 4
    clip_vision_width: int = 96
    clip_vision_layers: int = 3
    clip_vision_heads: int = 4
    clip_patch: int = 8
    # M-CLIP (XLM-R style)
    mclip_width: int = 128
    mclip_layers: int = 3
    mclip_heads: int = 4
    # MoVQ: levels = len(channels) -> downscale factor 2 ** (levels - 1)
    movq_channels: tuple[int, ...] = (32, 64, 64)
    movq_layers: int = 1
    movq_codes: int = 256
    # prior
    prior_heads: int = 4
    prior_head_dim: int = 32
    prior_layers: int = 4
    # decoder UNet
    unet_channels: tuple[int, ...] = (48, 96, 128)
    unet_layers: int = 1
    unet_head_dim: int = 16
    unet_groups: int = 16
    schedules: dict[str, StageSchedule] = field(default_factory=dict)
    # recommended inference settings recorded in the exported folders
    infer_steps: int = 50
    # chosen on bench/quality.py over 6 seeds (decoder 2-5, prior 2/3/5): see README "Training"
    infer_guidance: float = 3.0
    infer_prior_steps: int = 25
    infer_prior_guidance: float = 2.0

    def schedule(self, stage: str) -> StageSchedule:
        return self.schedules[stage]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BUNDLED = Preset(
    name="bundled",
    schedules={
        "clip": StageSchedule(steps=900, batch=128, lr=2e-3, warmup=50),
        "mclip": StageSchedule(steps=300, batch=128, lr=2e-3, warmup=30),
        "movq": StageSchedule(steps=1600, batch=16, lr=2e-3, warmup=50),
        "prior": StageSchedule(steps=2500, batch=128, lr=1e-3, warmup=50),
        "decoder": StageSchedule(steps=8500, batch=32, lr=1e-3, warmup=100),
        "inpaint": StageSchedule(steps=1000, batch=32, lr=2e-3, warmup=30),
    },
)

TINY = Preset(
    name="tiny", n_images=192, corpus=400, clip_vocab=600, mclip_vocab=300,
    clip_dim=32, clip_max_len=24, clip_text_layers=1, clip_text_heads=2, clip_vision_width=32,
    clip_vision_layers=1, clip_vision_heads=2, mclip_width=32, mclip_layers=1, mclip_heads=2,
    movq_channels=(32, 32), movq_codes=16, prior_heads=2, prior_head_dim=16, prior_layers=1,
    unet_channels=(32, 32), unet_head_dim=16, unet_groups=8, image_size=32, clip_patch=8,
    infer_steps=4, infer_prior_steps=3,
    schedules={
        "clip": StageSchedule(steps=30, batch=32, lr=3e-3, warmup=3),
        "mclip": StageSchedule(steps=30, batch=32, lr=3e-3, warmup=3),
        "movq": StageSchedule(steps=30, batch=8, lr=3e-3, warmup=3),
        "prior": StageSchedule(steps=30, batch=32, lr=3e-3, warmup=3),
        "decoder": StageSchedule(steps=30, batch=8, lr=2e-3, warmup=3),
        "inpaint": StageSchedule(steps=20, batch=8, lr=2e-3, warmup=3),
    },
)

PRESETS = {p.name: p for p in (BUNDLED, TINY)}


def get_preset(name: str, **overrides: Any) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------------------
# component configs, in the format of the exported config.json files


def clip_text_config(p: Preset, vocab_size: int, bos: int, eos: int, pad: int) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` fields; hidden width = projection = the CLIP embedding width."""
    return {
        "vocab_size": vocab_size, "hidden_size": p.clip_dim, "intermediate_size": 4 * p.clip_dim,
        "projection_dim": p.clip_dim, "num_hidden_layers": p.clip_text_layers,
        "num_attention_heads": p.clip_text_heads, "max_position_embeddings": p.clip_max_len,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
    }


def clip_vision_config(p: Preset) -> dict[str, Any]:
    """transformers ``CLIPVisionConfig`` fields."""
    return {
        "hidden_size": p.clip_vision_width, "intermediate_size": 4 * p.clip_vision_width,
        "projection_dim": p.clip_dim, "num_hidden_layers": p.clip_vision_layers,
        "num_attention_heads": p.clip_vision_heads, "num_channels": 3, "image_size": p.image_size,
        "patch_size": p.clip_patch, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
    }


def mclip_config(p: Preset, vocab_size: int) -> dict[str, Any]:
    """The decoder's ``text_encoder/config.json`` (MCLIPConfig: XLM-R fields + transformerDimensions/numDims)."""
    return {
        "vocab_size": vocab_size, "hidden_size": p.mclip_width, "num_hidden_layers": p.mclip_layers,
        "num_attention_heads": p.mclip_heads, "intermediate_size": 4 * p.mclip_width, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": MCLIP_MAX_POSITIONS, "type_vocab_size": 1, "initializer_range": 0.02,
        "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "position_embedding_type": "absolute", "use_cache": True, "classifier_dropout": None,
        "transformerDimensions": p.mclip_width, "numDims": p.clip_dim,
    }


def movq_config(p: Preset) -> MoVQConfig:
    n = len(p.movq_channels)
    return MoVQConfig(
        block_out_channels=p.movq_channels, layers_per_block=p.movq_layers, latent_channels=4, vq_embed_dim=4,
        num_vq_embeddings=p.movq_codes, norm_num_groups=32 if min(p.movq_channels) >= 32 else 8,
        down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
    )


def prior_config(p: Preset) -> PriorConfig:
    return PriorConfig(num_attention_heads=p.prior_heads, attention_head_dim=p.prior_head_dim,
                       num_layers=p.prior_layers, embedding_dim=p.clip_dim, num_embeddings=p.clip_max_len,
                       additional_embeddings=4)


def unet_config(p: Preset, in_channels: int = 4) -> UNetConfig:
    return UNetConfig(in_channels=in_channels, out_channels=8, block_out_channels=p.unet_channels,
                      layers_per_block=p.unet_layers, attention_head_dim=p.unet_head_dim,
                      cross_attention_dim=p.clip_dim, encoder_hid_dim=p.mclip_width,
                      norm_num_groups=p.unet_groups, norm_eps=1e-5)


def latent_size(p: Preset) -> int:
    return p.image_size // 2 ** (len(p.movq_channels) - 1)


def build_clip(p: Preset, text_cfg: dict[str, Any]) -> tuple[Any, Any]:
    """(CLIPTextModelWithProjection, CLIPVisionModelWithProjection) with fresh weights."""
    return build_clip_text(text_cfg), build_clip_vision(clip_vision_config(p))


def build_mclip(p: Preset, vocab_size: int) -> MultilingualCLIP:
    return MultilingualCLIP.from_dict(mclip_config(p, vocab_size))


def build_movq(p: Preset) -> MoVQ:
    return MoVQ(movq_config(p))


def build_prior(p: Preset) -> PriorTransformer:
    return PriorTransformer(prior_config(p))


def build_unet(p: Preset, in_channels: int = 4) -> DecoderUNet:
    return DecoderUNet(unet_config(p, in_channels))
