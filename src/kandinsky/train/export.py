"""Write trained components as diffusers-format folders (decoder, prior, inpaint), as ``save_pretrained`` would.

The folders load with ``Kandinsky21.from_pretrained`` and with diffusers' Kandinsky pipelines. Each records
its recommended call defaults in ``kandinsky_defaults.json``. Weights are stored as fp16 safetensors by
default (the loader casts to the requested dtype).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..imaging import CLIP_MEAN, CLIP_STD
from ..models.movq import MoVQ
from ..models.prior import PriorTransformer
from ..models.text_encoders import MultilingualCLIP
from ..models.unet import DecoderUNet
from .common import write_json
from .workspace import Workspace

DIFFUSERS_VERSION = "0.42.1"
DEFAULTS_FILE = "kandinsky_defaults.json"


# ----------------------------------------------------------------------------------------------------------
# config.json contents


def unet_json(unet: DecoderUNet, sample_size: int | None = None) -> dict[str, Any]:
    """``unet/config.json`` of a Kandinsky 2.1 UNet2DConditionModel with our UNet's sizes."""
    c = unet.config
    n = len(c.block_out_channels)
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "addition_embed_type": "text_image", "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": None, "attention_head_dim": c.attention_head_dim, "attention_type": "default",
        "block_out_channels": list(c.block_out_channels), "center_input_sample": False, "class_embed_type": None,
        "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": c.cross_attention_dim, "cross_attention_norm": None,
        "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (n - 1),
        "downsample_padding": 1, "dropout": c.dropout, "dual_cross_attention": False,
        "encoder_hid_dim": c.encoder_hid_dim, "encoder_hid_dim_type": "text_image_proj", "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": c.in_channels, "layers_per_block": c.layers_per_block,
        "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_eps": c.norm_eps,
        "norm_num_groups": c.norm_num_groups, "num_attention_heads": None, "num_class_embeds": None,
        "only_cross_attention": False, "out_channels": c.out_channels, "projection_class_embeddings_input_dim": None,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "scale_shift",
        "reverse_transformer_layers_per_block": None, "sample_size": sample_size, "time_cond_proj_dim": None,
        "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
        "timestep_post_act": None, "transformer_layers_per_block": 1,
        "up_block_types": ["SimpleCrossAttnUpBlock2D"] * (n - 1) + ["ResnetUpsampleBlock2D"],
        "upcast_attention": False, "use_linear_projection": False,
    }


def movq_json(movq: MoVQ, sample_size: int) -> dict[str, Any]:
    c = movq.config
    return {
        "_class_name": "VQModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "block_out_channels": list(c.block_out_channels), "down_block_types": list(c.down_block_types),
        "force_upcast": False, "in_channels": c.in_channels, "latent_channels": c.latent_channels,
        "layers_per_block": c.layers_per_block, "lookup_from_codebook": False, "mid_block_add_attention": True,
        "norm_num_groups": c.norm_num_groups, "norm_type": "spatial", "num_vq_embeddings": c.num_vq_embeddings,
        "out_channels": c.out_channels, "sample_size": sample_size, "scaling_factor": c.scaling_factor,
        "up_block_types": list(c.up_block_types), "vq_embed_dim": c.vq_embed_dim,
    }


def prior_json(prior: PriorTransformer) -> dict[str, Any]:
    c = prior.config
    return {
        "_class_name": "PriorTransformer", "_diffusers_version": DIFFUSERS_VERSION, "added_emb_type": "prd",
        "additional_embeddings": c.additional_embeddings, "attention_head_dim": c.attention_head_dim,
        "clip_embed_dim": c.clip_embed_dim, "dropout": 0.0, "embedding_dim": c.embedding_dim,
        "embedding_proj_dim": c.embedding_proj_dim, "embedding_proj_norm_type": None,
        "encoder_hid_proj_type": "linear", "norm_in_type": None, "num_attention_heads": c.num_attention_heads,
        "num_embeddings": c.num_embeddings, "num_layers": c.num_layers, "time_embed_act_fn": "silu",
        "time_embed_dim": c.time_embed_dim,
    }


def mclip_json(model: MultilingualCLIP, dtype: torch.dtype) -> dict[str, Any]:
    cfg = model.transformer.config
    keys = ("attention_probs_dropout_prob", "bos_token_id", "classifier_dropout", "eos_token_id", "hidden_act",
            "hidden_dropout_prob", "hidden_size", "initializer_range", "intermediate_size", "layer_norm_eps",
            "max_position_embeddings", "num_attention_heads", "num_hidden_layers", "pad_token_id",
            "position_embedding_type", "type_vocab_size", "use_cache", "vocab_size")
    out: dict[str, Any] = {"architectures": ["MultilingualCLIP"], "add_cross_attention": False,
                           "dtype": str(dtype).removeprefix("torch."), "is_decoder": False,
                           "model_type": "M-CLIP", "tie_word_embeddings": True}
    out |= {k: getattr(cfg, k, None) for k in keys}
    out["numDims"] = model.LinearTransformation.out_features
    out["transformerDimensions"] = model.LinearTransformation.in_features
    import transformers

    out["transformers_version"] = transformers.__version__
    return dict(sorted(out.items()))


DDIM_JSON = {
    "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_end": 0.012,
    "beta_schedule": "linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "steps_offset": 1,
    "thresholding": False, "timestep_spacing": "leading", "trained_betas": None,
}
DDPM_JSON = {
    "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_end": 0.012,
    "beta_schedule": "linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 2.0,
    "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False, "sample_max_value": 2.0, "steps_offset": 0, "thresholding": True,
    "timestep_spacing": "leading", "trained_betas": None, "variance_type": "learned_range",
}
UNCLIP_JSON = {
    "_class_name": "UnCLIPScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "beta_schedule": "squaredcos_cap_v2", "clip_sample": True, "clip_sample_range": 10.0,
    "num_train_timesteps": 1000, "prediction_type": "sample", "variance_type": "fixed_small_log",
}


def image_processor_json(size: int) -> dict[str, Any]:
    return {
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD), "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": size},
    }


def decoder_index(inpaint: bool) -> dict[str, Any]:
    return {
        "_class_name": "KandinskyInpaintPipeline" if inpaint else "KandinskyPipeline",
        "_diffusers_version": DIFFUSERS_VERSION, "movq": ["diffusers", "VQModel"],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["kandinsky", "MultilingualCLIP"],
        "tokenizer": ["transformers", "XLMRobertaTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    }


PRIOR_INDEX = {
    "_class_name": "KandinskyPriorPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "image_processor": ["transformers", "CLIPImageProcessor"], "prior": ["diffusers", "PriorTransformer"],
    "scheduler": ["diffusers", "UnCLIPScheduler"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
}


# ----------------------------------------------------------------------------------------------------------
# writers


def save_weights(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> None:
    """A state dict as safetensors with the ``{"format": "pt"}`` metadata transformers and diffusers write."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"format": "pt"})


def save_hf_model(model: nn.Module, folder: Path, dtype: torch.dtype | None) -> None:
    """A transformers model (CLIP text / vision tower) via ``save_pretrained``, optionally cast first."""
    if dtype is not None:
        model = _cast_copy(model, dtype)
    model.save_pretrained(str(folder), safe_serialization=True)


def _cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


def mclip_state(mclip: MultilingualCLIP) -> dict[str, torch.Tensor]:
    """M-CLIP weights plus an (unused, zero) XLM-R pooler, so that transformers finds every key it expects."""
    width = mclip.LinearTransformation.in_features
    return {**mclip.state_dict(), "transformer.pooler.dense.weight": torch.zeros(width, width),
            "transformer.pooler.dense.bias": torch.zeros(width)}


def write_decoder_folder(folder: Path, unet: DecoderUNet, movq: MoVQ, mclip: MultilingualCLIP, tokenizer: Any,
                         defaults: dict[str, Any] | None, *, image_size: int, dtype: torch.dtype | None) -> Path:
    """A kandinsky-2-1 (or, for a 9-channel UNet, -2-1-inpaint) folder."""
    folder = Path(folder)
    inpaint = unet.config.in_channels == 9
    _fresh(folder)
    write_json(folder / "model_index.json", decoder_index(inpaint))
    latent = image_size // movq.config.downscale_factor
    write_json(folder / "unet" / "config.json", unet_json(unet, latent))
    save_weights(unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.safetensors", dtype)
    write_json(folder / "movq" / "config.json", movq_json(movq, image_size))
    save_weights(movq.state_dict(), folder / "movq" / "diffusion_pytorch_model.safetensors", dtype)
    write_json(folder / "text_encoder" / "config.json", mclip_json(mclip, dtype or torch.float32))
    save_weights(mclip_state(mclip), folder / "text_encoder" / "model.safetensors", dtype)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    write_json(folder / "scheduler" / "scheduler_config.json", DDIM_JSON)
    write_json(folder / "ddpm_scheduler" / "scheduler_config.json", DDPM_JSON)
    if defaults:
        write_json(folder / DEFAULTS_FILE, defaults)
    return folder


def write_prior_folder(folder: Path, prior: PriorTransformer, text: nn.Module, vision: nn.Module, tokenizer: Any,
                       defaults: dict[str, Any] | None, *, image_size: int, dtype: torch.dtype | None) -> Path:
    """A kandinsky-2-1-prior folder."""
    folder = Path(folder)
    _fresh(folder)
    write_json(folder / "model_index.json", PRIOR_INDEX)
    write_json(folder / "prior" / "config.json", prior_json(prior))
    save_weights(prior.state_dict(), folder / "prior" / "diffusion_pytorch_model.safetensors", dtype)
    save_hf_model(text, folder / "text_encoder", dtype)
    save_hf_model(vision, folder / "image_encoder", dtype)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    write_json(folder / "image_processor" / "preprocessor_config.json", image_processor_json(image_size))
    write_json(folder / "scheduler" / "scheduler_config.json", UNCLIP_JSON)
    if defaults:
        write_json(folder / DEFAULTS_FILE, defaults)
    return folder


def _fresh(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------------------


def export(ws: Workspace, target: Path | None = None, dtype: torch.dtype | None = torch.float16) -> dict[str, Path]:
    """Write ``decoder``, ``prior`` and (if trained) ``inpaint`` folders into ``target`` (default
    ``<out>/export``); returns their paths."""
    from .decoder import load_unet
    from .prior import load_prior

    p = ws.preset
    target = Path(target) if target is not None else ws.root / "export"
    text, vision = ws.clip_models()
    movq, mclip, mtok = ws.movq_model(), ws.mclip_model(), ws.mclip_tokenizer()
    decoder_defaults = {"width": p.image_size, "height": p.image_size, "steps": p.infer_steps,
                        "guidance_scale": p.infer_guidance, "sampler": "ddim"}
    prior_defaults = {"steps": p.infer_prior_steps, "guidance_scale": p.infer_prior_guidance}
    out = {
        "decoder": write_decoder_folder(target / "decoder", load_unet(ws, "decoder"), movq, mclip, mtok,
                                        decoder_defaults, image_size=p.image_size, dtype=dtype),
        "prior": write_prior_folder(target / "prior", load_prior(ws), text, vision, ws.clip_tokenizer(),
                                    prior_defaults, image_size=p.image_size, dtype=dtype),
    }
    if ws.done("inpaint") is not None:
        out["inpaint"] = write_decoder_folder(target / "inpaint", load_unet(ws, "inpaint"), movq, mclip, mtok,
                                              decoder_defaults, image_size=p.image_size, dtype=dtype)
    elif (target / "inpaint").exists():
        shutil.rmtree(target / "inpaint")
    return out
