"""Tiny random-weight Kandinsky 2.1 pipelines built with diffusers' own classes, entirely offline.

Tokenizers are made here from small vocabularies; nothing comes from a hub. ``save_*`` write the folders in the
published layout with ``save_pretrained``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

DIM = 32  # CLIP embedding width of the tiny models (prior embedding_dim = UNet cross_attention_dim)
WORDS = ("a an the red blue green yellow small big circle square star on of in background cat dog "
         "красный синий круг квадрат на фоне").split()

DECODER_CONFIGS = {
    "a": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4),
    "b": dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8),
}
PRIOR_CONFIGS = {
    "a": dict(num_attention_heads=2, attention_head_dim=12, num_layers=1),
    "b": dict(num_attention_heads=4, attention_head_dim=8, num_layers=2),
}


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so that no weight is trivially zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def xlmr_tokenizer():
    from transformers import XLMRobertaTokenizer

    pieces = ["▁" + w for w in WORDS] + list(string.ascii_lowercase) + ["▁"] + list("абвгдеёжзийклмнопрстуфхцчшщъыьэюя")
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -float(i % 7 + 1)) for i, p in enumerate(pieces)] + [("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=77)


def clip_tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["r e", "re d</w>", "c i", "ci r", "b l", "bl u", "blu e</w>", "s q", "sq u"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"), model_max_length=77)


def build_prior_pipeline(tmp: Path, variant: str = "a", seed: int = 0):
    from diffusers import KandinskyPriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(tmp / "clip_vocab")
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=DIM, projection_dim=DIM, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
        num_hidden_layers=3, vocab_size=len(tokenizer)))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=DIM, image_size=32, projection_dim=DIM, intermediate_size=37, num_attention_heads=4,
        num_channels=3, num_hidden_layers=3, patch_size=8))
    prior = PriorTransformer(embedding_dim=DIM, num_embeddings=77, additional_embeddings=4, **PRIOR_CONFIGS[variant])
    randomize(text_encoder, seed + 1, 0.02)
    randomize(image_encoder, seed + 2, 0.02)
    randomize(prior, seed + 3)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 4)
        prior.clip_mean.copy_(torch.randn(prior.clip_mean.shape, generator=g) * 0.5)
        prior.clip_std.copy_(1 + torch.rand(prior.clip_std.shape, generator=g))
    processor = CLIPImageProcessor(crop_size=32, size=32, do_center_crop=True, do_normalize=True, do_resize=True,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711], resample=3)
    scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                clip_sample=True, clip_sample_range=10.0)
    return KandinskyPriorPipeline(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder,
                                  tokenizer=tokenizer, scheduler=scheduler, image_processor=processor)


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                         thresholding=False)


def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                         variance_type="learned_range", thresholding=True, dynamic_thresholding_ratio=0.995,
                         sample_max_value=2.0, clip_sample=False, clip_sample_range=2.0, steps_offset=0,
                         prediction_type="epsilon")


def unet_config(variant: str = "a", in_channels: int = 4) -> dict:
    v = DECODER_CONFIGS[variant]
    n = len(v["block_out_channels"])
    return dict(
        in_channels=in_channels, out_channels=8, addition_embed_type="text_image",
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=v["block_out_channels"],
        layers_per_block=v["layers_per_block"], encoder_hid_dim=DIM, encoder_hid_dim_type="text_image_proj",
        cross_attention_dim=DIM, attention_head_dim=v["attention_head_dim"], resnet_time_scale_shift="scale_shift",
        class_embed_type=None, norm_num_groups=8,
    )


def build_decoder_pipeline(variant: str = "a", seed: int = 0, inpaint: bool = False):
    from diffusers import KandinskyInpaintPipeline, KandinskyPipeline, UNet2DConditionModel, VQModel
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    torch.manual_seed(seed)
    tokenizer = xlmr_tokenizer()
    text_encoder = MultilingualCLIP(MCLIPConfig(
        numDims=DIM, transformerDimSize=DIM, hidden_size=DIM, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=3, vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=0, eos_token_id=2,
        max_position_embeddings=80))
    unet = UNet2DConditionModel(**unet_config(variant, 9 if inpaint else 4))
    movq = VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                   vq_embed_dim=4)
    randomize(text_encoder, seed + 11, 0.02)
    randomize(unet, seed + 12, 0.02)
    randomize(movq, seed + 13, 0.02)
    cls = KandinskyInpaintPipeline if inpaint else KandinskyPipeline
    return cls(text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=ddim_scheduler(), movq=movq)


def save_decoder(pipe, folder: Path, safe: bool = True) -> Path:
    pipe.save_pretrained(str(folder), safe_serialization=safe)
    ddpm_scheduler().save_pretrained(str(folder / "ddpm_scheduler"))
    return folder


def save_prior(pipe, folder: Path, safe: bool = True) -> Path:
    pipe.save_pretrained(str(folder), safe_serialization=safe)
    return folder
