"""The original Kandinsky 2.1 file set: key mapping, loading, fp16 handling and conversion.

Tiny random diffusers pipelines (conftest) are written out in the *original* layout (``.ckpt`` state dicts, the
CLIP stats pair, an OpenAI-layout CLIP saved as a real TorchScript archive, the M-CLIP ``text_encoder/`` folder).
Loading them must give the same modules as loading the diffusers folders of the same weights. The attention
layouts (head-major fused QKV, OpenAI ``in_proj`` thirds) are checked against independent re-implementations
of the original layers, so a mapping and its inverse cannot share an unnoticed mistake.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.weights import original_format as of
from kandinsky.weights.convert import convert
from kandinsky.weights.diffusers_format import load_decoder, load_prior

diffusers = pytest.importorskip("diffusers")

# what the tensors of the tiny models cannot reveal (tests/tiny.py, variant "a")
TINY = {"unet": {"attention_head_dim": 4, "norm_num_groups": 8}, "movq": {"norm_num_groups": 8},
        "prior": {"attention_head_dim": 12}, "clip_text": {"num_attention_heads": 4},
        "clip_vision": {"num_attention_heads": 4}}
TOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# an OpenAI-layout CLIP (the layout of clip.model.CLIP for ViTs), written here from the published architecture


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, attn_mask: torch.Tensor | None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(mlp, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp: int, attn_mask: torch.Tensor | None) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, mlp, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, image: int, patch: int, width: int, layers: int, heads: int, mlp: int, out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp, None)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAICLIP(nn.Module):
    def __init__(self, text_cfg, vision_cfg) -> None:
        super().__init__()
        width, ctx = text_cfg.hidden_size, text_cfg.max_position_embeddings
        self.visual = VisionTransformer(vision_cfg.image_size, vision_cfg.patch_size, vision_cfg.hidden_size,
                                        vision_cfg.num_hidden_layers, vision_cfg.num_attention_heads,
                                        vision_cfg.intermediate_size, vision_cfg.projection_dim)
        mask = torch.full((ctx, ctx), float("-inf")).triu(1)
        self.transformer = Transformer(width, text_cfg.num_hidden_layers, text_cfg.num_attention_heads,
                                       text_cfg.intermediate_size, mask)
        self.token_embedding = nn.Embedding(text_cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, text_cfg.projection_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        pooled = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
        return self.visual(image), pooled, x


def openai_clip_from_hf(text_encoder, image_encoder) -> OpenAICLIP:
    model = OpenAICLIP(text_encoder.config, image_encoder.config).eval()
    sd = of.clip_to_openai(text_encoder.state_dict(), image_encoder.state_dict())
    model.load_state_dict({**sd, "logit_scale": model.logit_scale.detach().clone()}, strict=True)
    return model


# ----------------------------------------------------------------------------------------------------------------
# writing an original file set from tiny diffusers pipelines


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).clone() if v.is_floating_point() else v.clone() for k, v in sd.items()}


def write_original(folder: Path, decoder_pipe, prior_pipe, inpaint_pipe, *, dtype: torch.dtype = torch.float32,
                   fp16_names: bool = False) -> Path:
    """An original-layout folder holding the weights of the three tiny pipelines ((pipe, saved folder) pairs)."""
    folder.mkdir(parents=True)
    dec, dec_dir = decoder_pipe
    prior, prior_dir = prior_pipe
    suffix = "_fp16" if fp16_names else ""
    head = TINY["unet"]["attention_head_dim"]
    torch.save(_cast(of.unet_to_original(dec.unet.state_dict(), head_dim=head), dtype),
               folder / f"decoder{suffix}.ckpt")
    torch.save(_cast(of.unet_to_original(inpaint_pipe[0].unet.state_dict(), head_dim=head), dtype),
               folder / f"inpainting{suffix}.ckpt")
    torch.save(_cast(of.movq_to_original(dec.movq.state_dict()), dtype), folder / "movq_final.ckpt")
    prior_sd, (mean, std) = of.prior_to_original(prior.prior.state_dict(),
                                                 head_dim=TINY["prior"]["attention_head_dim"])
    torch.save(_cast(prior_sd, dtype), folder / "prior_fp16.ckpt")
    torch.save((mean.clone(), std.clone()), folder / "ViT-L-14_stats.th")
    clip = openai_clip_from_hf(prior.text_encoder, prior.image_encoder).to(dtype)
    torch.jit.save(torch.jit.script(clip), str(folder / "ViT-L-14.pt"))
    te = folder / "text_encoder"
    te.mkdir()
    shutil.copyfile(dec_dir / "text_encoder" / "config.json", te / "config.json")
    torch.save(_cast(dec.text_encoder.state_dict(), dtype), te / "pytorch_model.bin")
    for f in (dec_dir / "tokenizer").iterdir():
        shutil.copyfile(f, te / f.name)
    shutil.copytree(prior_dir / "tokenizer", folder / "clip_tokenizer")
    return folder


@pytest.fixture(scope="module")
def original(tmp_path_factory, decoder_pipe, prior_pipe, inpaint_pipe) -> Path:
    return write_original(tmp_path_factory.mktemp("orig") / "Kandinsky_2.1", decoder_pipe, prior_pipe, inpaint_pipe)


@pytest.fixture(scope="module")
def from_original(original):
    return of.load_original(original, configs=TINY)


@pytest.fixture(scope="module")
def from_diffusers(decoder_pipe, prior_pipe, inpaint_pipe):
    return (load_decoder(decoder_pipe[1], inpaint=False), load_prior(prior_pipe[1]),
            load_decoder(inpaint_pipe[1], inpaint=True))


# ----------------------------------------------------------------------------------------------------------------
# helpers


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def max_diff(x, y) -> float:
    return float((torch.as_tensor(x).float() - torch.as_tensor(y).float()).abs().max())


def unet_inputs(unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    d = cfg.cross_attention_dim
    sample = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    image, pooled = torch.randn(2, d, generator=g), torch.randn(2, d, generator=g)
    hidden = torch.randn(2, 77, cfg.encoder_hid_dim, generator=g)
    return sample, image, pooled, hidden


@torch.no_grad()
def run_unet(unet, seed: int = 0) -> torch.Tensor:
    sample, image, pooled, hidden = unet_inputs(unet, seed)
    return unet(sample, torch.tensor([999, 10]), unet.prepare_condition(image, pooled, hidden))


def text_ids(tokenizer, prompts=("a red circle", "")) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids


# ----------------------------------------------------------------------------------------------------------------
# equivalence with the diffusers-format load of the same weights


@pytest.mark.parametrize("which", ["decoder", "inpaint"])
def test_unet_matches_diffusers_format(from_original, from_diffusers, which):
    index = 0 if which == "decoder" else 2
    ours, ref = from_original[index].unet, from_diffusers[index].unet
    assert ours.config == ref.config
    assert ours.config.in_channels == (4 if which == "decoder" else 9)
    assert_same_tensors(ours, ref)
    assert max_diff(run_unet(ours), run_unet(ref)) <= TOL


@torch.no_grad()
def test_prior_matches_diffusers_format(from_original, from_diffusers):
    ours, ref = from_original[1].prior, from_diffusers[1].prior
    assert_same_tensors(ours, ref)
    g = torch.Generator().manual_seed(1)
    d = ours.config.embedding_dim
    args = (torch.randn(2, d, generator=g), torch.tensor([999, 3]), torch.randn(2, d, generator=g),
            torch.randn(2, 77, d, generator=g), (torch.arange(77) < 5).expand(2, 77))
    assert max_diff(ours(*args), ref(*args)) <= TOL
    assert torch.equal(ours.clip_mean, ref.clip_mean) and torch.equal(ours.clip_std, ref.clip_std)


@torch.no_grad()
def test_movq_matches_diffusers_format(from_original, from_diffusers):
    ours, ref = from_original[0].movq, from_diffusers[0].movq
    assert_same_tensors(ours, ref)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert max_diff(ours.encode(x), ref.encode(x)) <= TOL
    z = ref.encode(x)
    assert max_diff(ours.decode(z), ref.decode(z)) <= TOL
    assert from_original[2].movq is ours  # decoder and inpaint share one MoVQ and one M-CLIP


@torch.no_grad()
def test_mclip_matches_diffusers_format(from_original, from_diffusers):
    ours, ref = from_original[0], from_diffusers[0]
    assert_same_tensors(ours.text_encoder, ref.text_encoder)
    tok = ours.tokenizer(["a red circle", "красный круг"], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt")
    ref_tok = ref.tokenizer(["a red circle", "красный круг"], padding="max_length", max_length=77,
                            truncation=True, return_tensors="pt")
    assert torch.equal(tok.input_ids, ref_tok.input_ids)
    a = ours.text_encoder(tok.input_ids, tok.attention_mask)
    b = ref.text_encoder(tok.input_ids, tok.attention_mask)
    assert max(max_diff(x, y) for x, y in zip(a, b, strict=True)) <= TOL


@torch.no_grad()
def test_clip_towers_match_diffusers_format_and_openai_reference(from_original, from_diffusers, prior_pipe):
    ours, ref = from_original[1], from_diffusers[1]
    assert_same_tensors(ours.text_encoder, ref.text_encoder)
    assert_same_tensors(ours.image_encoder, ref.image_encoder)
    ids = text_ids(ours.tokenizer)
    assert torch.equal(ids, text_ids(ref.tokenizer))
    assert ours.tokenizer.model_max_length == 77
    a, b = ours.text_encoder(ids), ref.text_encoder(ids)
    assert max_diff(a.text_embeds, b.text_embeds) <= TOL
    assert max_diff(a.last_hidden_state, b.last_hidden_state) <= TOL
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert max_diff(ours.image_encoder(pixel_values=pixels).image_embeds,
                    ref.image_encoder(pixel_values=pixels).image_embeds) <= TOL
    # an independent OpenAI-layout implementation with the mapped weights agrees with transformers' CLIP
    openai = openai_clip_from_hf(prior_pipe[0].text_encoder, prior_pipe[0].image_encoder)
    image, pooled, hidden = openai(pixels, ids)
    assert max_diff(image, ours.image_encoder(pixel_values=pixels).image_embeds) <= TOL
    assert max_diff(pooled, a.text_embeds) <= TOL
    assert max_diff(hidden, a.last_hidden_state) <= TOL


def test_synthesised_configs(from_original, from_diffusers):
    dec, prior, inpaint = from_original
    ref_dec, ref_prior, _ = from_diffusers
    for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "set_alpha_to_one", "steps_offset",
                "prediction_type", "clip_sample"):
        assert dec.scheduler_config[key] == ref_dec.scheduler_config[key], key
    for key in ("variance_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "steps_offset"):
        assert dec.ddpm_scheduler_config[key] == ref_dec.ddpm_scheduler_config[key], key
    for key in ("variance_type", "prediction_type", "clip_sample", "clip_sample_range", "num_train_timesteps"):
        assert prior.scheduler_config[key] == ref_prior.scheduler_config[key], key
    proc = prior.image_processor_config
    assert proc["size"] == ref_prior.image_processor_config["size"]
    assert proc["image_mean"] == ref_prior.image_processor_config["image_mean"]
    assert proc["image_std"] == ref_prior.image_processor_config["image_std"]
    assert inpaint.scheduler_config == dec.scheduler_config


# ----------------------------------------------------------------------------------------------------------------
# the fused attention layouts, against re-implementations of the original layers


@torch.no_grad()
def test_unet_qkv_is_head_major(original, from_original):
    """guided-diffusion's AttentionBlock with QKVAttentionLegacy and encoder_kv, on the original tensors."""
    sd = torch.load(original / "decoder.ckpt", weights_only=True)
    unet = from_original[0].unet
    attn, prefix = unet.down_blocks[1].attentions[0], "input_blocks.3.1"  # layers_per_block 1 -> 1 + 1*2 + 0
    c, head = attn.to_q.weight.shape[0], TINY["unet"]["attention_head_dim"]
    heads = c // head
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, c, 4, 4, generator=g)
    context = torch.randn(2, 87, unet.config.cross_attention_dim, generator=g)

    h = F.group_norm(x, 8, sd[f"{prefix}.norm.weight"], sd[f"{prefix}.norm.bias"], 1e-5).reshape(2, c, -1)
    qkv = F.conv1d(h, sd[f"{prefix}.qkv.weight"], sd[f"{prefix}.qkv.bias"])
    ekv = F.conv1d(context.transpose(1, 2), sd[f"{prefix}.encoder_kv.weight"], sd[f"{prefix}.encoder_kv.bias"])
    q, k, v = qkv.reshape(2 * heads, 3 * head, -1).split(head, dim=1)
    ek, ev = ekv.reshape(2 * heads, 2 * head, -1).split(head, dim=1)
    k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
    scale = 1 / math.sqrt(math.sqrt(head))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(2, c, -1)
    expected = x + F.conv1d(a, sd[f"{prefix}.proj_out.weight"], sd[f"{prefix}.proj_out.bias"]).reshape(x.shape)

    got = attn(x.clone(), *attn.context_kv(context))
    assert max_diff(got, expected) <= TOL


@torch.no_grad()
def test_prior_qkv_is_head_major(original, from_original):
    """The original prior's multi-head attention (qkv viewed as (heads, 3 * head_dim) per token)."""
    sd = torch.load(original / "prior_fp16.ckpt", weights_only=True)
    attn = from_original[1].prior.transformer_blocks[0].attn1
    p = "model.transformer.resblocks.0.attn"
    head = TINY["prior"]["attention_head_dim"]
    x = torch.randn(2, 9, attn.to_q.in_features, generator=torch.Generator().manual_seed(5))
    qkv = F.linear(x, sd[f"{p}.c_qkv.weight"], sd[f"{p}.c_qkv.bias"])
    heads = qkv.shape[-1] // (3 * head)
    q, k, v = qkv.view(2, 9, heads, 3 * head).split(head, dim=-1)
    scale = 1 / math.sqrt(math.sqrt(head))
    w = torch.softmax(torch.einsum("bthc,bshc->bhts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bhts,bshc->bthc", w, v).reshape(2, 9, -1)
    expected = F.linear(a, sd[f"{p}.c_proj.weight"], sd[f"{p}.c_proj.bias"])
    assert max_diff(attn(x, torch.zeros(2, 1, 9, 9)), expected) <= TOL


def test_full_size_key_counts():
    """The mappings of the published architectures produce the SPEC 4.3 tensor counts and shapes."""
    from kandinsky.models.movq import MoVQ
    from kandinsky.models.prior import PriorTransformer
    from kandinsky.models.unet import DecoderUNet

    with torch.device("meta"):
        unet, prior, movq = DecoderUNet(), PriorTransformer(), MoVQ()
    u = of.unet_to_original(unet.state_dict())
    assert len(u) == 594
    assert tuple(u["input_blocks.5.1.qkv.weight"].shape) == (2304, 768, 1)
    assert tuple(u["input_blocks.5.1.encoder_kv.weight"].shape) == (1536, 768, 1)
    assert tuple(u["clip_to_seq.weight"].shape) == (7680, 768)
    skips = sorted(int(k.split(".")[1]) for k in u if k.startswith("input_blocks") and "skip_connection.weight" in k)
    assert skips == [5, 9, 13]
    assert all(f"output_blocks.{i}.0.skip_connection.weight" in u for i in range(16))
    assert {f"output_blocks.{i}.2.in_layers.0.weight" for i in (3, 7, 11)} <= set(u)
    assert of.unet_config_from_original(u)["block_out_channels"] == [384, 768, 1152, 1536]
    p, _ = of.prior_to_original(prior.state_dict())
    assert len(p) == 256 and tuple(p["model.transformer.resblocks.0.attn.c_qkv.weight"].shape) == (6144, 2048)
    m = of.movq_to_original(movq.state_dict())
    assert len(m) == 431
    assert sorted(k for k in m if k.endswith("nin_shortcut.weight")) == sorted(
        ["encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.3.block.0.nin_shortcut.weight",
         "decoder.up.2.block.0.nin_shortcut.weight", "decoder.up.0.block.0.nin_shortcut.weight"])
    assert "decoder.up.3.attn.2.norm.conv_y.weight" in m and tuple(m["decoder.up.3.attn.0.q.weight"].shape) == (
        512, 512, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# files given one by one, errors naming keys and files


def test_files_one_by_one(original, from_original, tmp_path):
    spread = {}
    for name, key in (("decoder.ckpt", "decoder"), ("prior_fp16.ckpt", "prior"), ("movq_final.ckpt", "movq"),
                      ("ViT-L-14.pt", "clip"), ("ViT-L-14_stats.th", "clip_stats")):
        (tmp_path / key).mkdir()
        spread[key] = shutil.copy(original / name, tmp_path / key / name)
    dec, prior, inpaint = of.load_original(
        None, **spread, text_encoder=original / "text_encoder", clip_tokenizer=original / "clip_tokenizer",
        configs=TINY)
    assert inpaint is None
    assert_same_tensors(dec.unet, from_original[0].unet)
    assert_same_tensors(prior.prior, from_original[1].prior)
    assert_same_tensors(prior.image_encoder, from_original[1].image_encoder)
    # an explicit path overrides the folder's file (here: the inpainting UNet given as the inpaint model)
    _, _, inp = of.load_original(original, inpaint=original / "inpainting.ckpt", configs=TINY)
    assert_same_tensors(inp.unet, from_original[2].unet)
    assert of.load_original(original, inpaint=False, configs=TINY)[2] is None


def test_unused_and_missing_tensors_are_named(original, tmp_path):
    sd = torch.load(original / "decoder.ckpt", weights_only=True)
    sd["input_blocks.1.0.extra.weight"] = torch.zeros(1)
    del sd["middle_block.1.qkv.bias"]
    bad = tmp_path / "decoder.ckpt"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"decoder\.ckpt") as err:
        of.load_original(original, decoder=bad, configs=TINY)
    assert "input_blocks.1.0.extra.weight" in str(err.value) and "middle_block.1.qkv.bias" in str(err.value)

    prior = torch.load(original / "prior_fp16.ckpt", weights_only=True)
    prior["model.cf_param"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"my_prior\.ckpt.*unused tensors model\.cf_param"):
        of.prior_from_original(prior, (torch.zeros(32), torch.ones(32)), head_dim=12, source="my_prior.ckpt")
    clip = of.read_torchscript_tensors(original / "ViT-L-14.pt")
    del clip["visual.proj"]
    with pytest.raises(ValueError, match=r"ViT.*missing tensors visual\.proj"):
        of.clip_from_openai(clip, source="ViT-L-14.pt")


def test_wrong_file_for_the_role(original):
    with pytest.raises(ValueError, match=r"inpainting\.ckpt.*9-channel"):
        of.load_original(original, decoder=original / "inpainting.ckpt", configs=TINY)
    with pytest.raises(ValueError, match=r"movq_final\.ckpt"):
        of.load_original(original, prior=original / "movq_final.ckpt", configs=TINY)
    with pytest.raises(ValueError, match=r"head width|multiple"):
        of.load_original(original, configs={**TINY, "unet": {"attention_head_dim": 24, "norm_num_groups": 8}})


def test_missing_files_say_what_to_provide(original, tmp_path, monkeypatch):
    """Offline with nothing cached (an empty Hugging Face cache, no `clip` package), the CLIP tokenizer the
    release lacks cannot be fetched: the error says how to get it."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from kandinsky.weights import original_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    monkeypatch.setattr(original_hub, "BPE_PACKAGES", ())
    folder = tmp_path / "partial"
    shutil.copytree(original, folder, ignore=shutil.ignore_patterns("clip_tokenizer"))
    with pytest.raises(FileNotFoundError, match=r"clip_tokenizer.*|kandinsky download original") as err:
        of.load_original(folder, configs=TINY)
    assert "clip_tokenizer=" in str(err.value) and "`kandinsky download original`" in str(err.value)
    (folder / "movq_final.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="movq"):
        of.load_original(folder, clip_tokenizer=original / "clip_tokenizer", configs=TINY)


def test_clip_tokenizer_from_openai_bpe(tmp_path):
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "l e</w>"]
    bpe = tmp_path / of.OPENAI_BPE_FILE
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2"] + merges + ["x y", "y z"]) + "\n")
    tok = of.load_clip_tokenizer(bpe)
    vocab = tok.get_vocab()
    assert len(vocab) == 512 + len(merges) + 2 + 2
    assert vocab["!"] == 0 and vocab["red</w>"] == 512 + 1
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    ids = tok("Red circle", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [vocab["<|startoftext|>"], vocab["red</w>"], vocab["circ"], vocab["le</w>"]]
    assert ids[4] == vocab["<|endoftext|>"] and len(ids) == 77 and tok.model_max_length == 77
    small = of.clip_tokenizer_files_from_openai_bpe(bpe, tmp_path / "tok", max_merges=2)
    assert len(json.loads((small / "vocab.json").read_text())) == 512 + 2 + 2


# ----------------------------------------------------------------------------------------------------------------
# fp16 files


@pytest.fixture(scope="module")
def original_fp16(tmp_path_factory, decoder_pipe, prior_pipe, inpaint_pipe) -> Path:
    return write_original(tmp_path_factory.mktemp("orig16") / "Kandinsky_2.1", decoder_pipe, prior_pipe, inpaint_pipe,
                          dtype=torch.float16, fp16_names=True)


def test_fp16_files_load_as_fp32_on_cpu(original_fp16, from_original):
    assert torch.load(original_fp16 / "decoder_fp16.ckpt", weights_only=True)["out.2.weight"].dtype == torch.float16
    dec, prior, inpaint = of.load_original(original_fp16, configs=TINY)
    for module, ref in ((dec.unet, from_original[0].unet), (inpaint.unet, from_original[2].unet),
                        (dec.movq, from_original[0].movq), (dec.text_encoder, from_original[0].text_encoder),
                        (prior.prior, from_original[1].prior), (prior.text_encoder, from_original[1].text_encoder),
                        (prior.image_encoder, from_original[1].image_encoder)):
        ours, theirs = module.state_dict(), ref.state_dict()
        for k, v in ours.items():
            if v.is_floating_point():
                assert v.dtype == torch.float32, k
                expected = theirs[k] if k.endswith(("clip_mean", "clip_std")) else theirs[k].half().float()
                assert torch.equal(v, expected), k
    out = run_unet(dec.unet)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    bf16 = of.load_original(original_fp16, dtype="bf16", inpaint=False, configs=TINY)[0]
    assert bf16.unet.conv_in.weight.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_files_stay_fp16_on_cuda(original_fp16, from_original):
    dec, prior, _ = of.load_original(original_fp16, device="cuda", inpaint=False, configs=TINY)
    for module in (dec.unet, dec.movq, dec.text_encoder, prior.prior, prior.text_encoder, prior.image_encoder):
        weights = [p for p in module.parameters() if p.is_floating_point()]
        assert all(p.dtype == torch.float16 and p.is_cuda for p in weights)
    ref = from_original[0].unet.state_dict()
    assert all(torch.equal(v.cpu(), ref[k].half()) for k, v in dec.unet.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# conversion


@pytest.fixture(scope="module")
def converted(tmp_path_factory, original) -> Path:
    dst = tmp_path_factory.mktemp("converted") / "diffusers"
    written = convert(original, dst, to="diffusers", dtype="fp32", progress=False, configs=TINY)
    assert written == [dst / "decoder", dst / "prior", dst / "inpaint"]
    return dst


def test_convert_round_trip_gives_identical_tensors(converted, from_original):
    dec, prior, inpaint = (load_decoder(converted / "decoder", inpaint=False), load_prior(converted / "prior"),
                           load_decoder(converted / "inpaint", inpaint=True))
    for a, b in ((dec, from_original[0]), (inpaint, from_original[2])):
        for name in ("unet", "movq", "text_encoder"):
            assert_same_tensors(getattr(a, name), getattr(b, name))
        assert a.scheduler_config["steps_offset"] == 1 and a.ddpm_scheduler_config["variance_type"] == "learned_range"
    for name in ("prior", "text_encoder", "image_encoder"):
        assert_same_tensors(getattr(prior, name), getattr(from_original[1], name))
    assert torch.equal(text_ids(prior.tokenizer), text_ids(from_original[1].tokenizer))
    assert prior.image_processor_config["size"] == {"shortest_edge": 32}
    index = json.loads((converted / "decoder" / "model_index.json").read_text())
    assert index["_class_name"] == "KandinskyPipeline" and index["text_encoder"] == ["kandinsky", "MultilingualCLIP"]
    assert (converted / "decoder" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@torch.no_grad()
def test_diffusers_loads_converted_folders(converted, decoder_pipe, prior_pipe, inpaint_pipe):
    pipe = diffusers.KandinskyPipeline.from_pretrained(str(converted / "decoder"), local_files_only=True)
    ref = decoder_pipe[0]
    sample, image, pooled, hidden = unet_inputs(ref.unet)
    kwargs = dict(encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "image_embeds": image})
    a = pipe.unet(sample, torch.tensor([999, 10]), **kwargs).sample
    b = ref.unet(sample, torch.tensor([999, 10]), **kwargs).sample
    assert max_diff(a, b) <= TOL
    tok = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    a = pipe.text_encoder(tok.input_ids, tok.attention_mask)
    b = ref.text_encoder(tok.input_ids, tok.attention_mask)
    assert max(max_diff(x, y) for x, y in zip(a, b, strict=True)) <= TOL
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    assert max_diff(pipe.movq.decode(z, force_not_quantize=True).sample,
                    ref.movq.decode(z, force_not_quantize=True).sample) <= TOL

    prior = diffusers.KandinskyPriorPipeline.from_pretrained(str(converted / "prior"), local_files_only=True)
    prior.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", num_inference_steps=2, output_type="pt")
    a = prior(**kw, generator=torch.Generator().manual_seed(0))
    b = prior_pipe[0](**kw, generator=torch.Generator().manual_seed(0))
    assert max_diff(a.image_embeds, b.image_embeds) <= TOL
    assert max_diff(a.negative_image_embeds, b.negative_image_embeds) <= TOL

    inpaint = diffusers.KandinskyInpaintPipeline.from_pretrained(str(converted / "inpaint"), local_files_only=True)
    sample = torch.randn(2, 9, 16, 16, generator=torch.Generator().manual_seed(8))
    assert max_diff(inpaint.unet(sample, torch.tensor([999, 10]), **kwargs).sample,
                    inpaint_pipe[0].unet(sample, torch.tensor([999, 10]), **kwargs).sample) <= TOL


def test_convert_never_overwrites_silently(converted, original, tmp_path):
    marker = converted / "decoder" / "model_index.json"
    before = marker.read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(original, converted, to="diffusers", progress=False, configs=TINY)
    assert marker.read_text() == before
    bad = tmp_path / "decoder.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"decoder\.ckpt"):  # inputs are checked before anything is replaced
        convert(original, converted, to="diffusers", progress=False, configs=TINY, overwrite=True, decoder=bad)
    assert marker.read_text() == before


def test_convert_fp16_diffusers_and_progress_bar(original, tmp_path, capsys):
    dst = tmp_path / "fp16"
    convert(original, dst, to="diffusers", dtype="fp16", inpaint=False, configs=TINY)
    assert not (dst / "inpaint").exists()
    assert "converting" in capsys.readouterr().err
    from safetensors.torch import load_file

    unet = load_file(dst / "decoder" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in unet.values()} == {torch.float16}
    loaded = load_decoder(dst / "decoder", inpaint=False)
    assert loaded.unet.conv_in.weight.dtype == torch.float32
    convert(original, dst, to="diffusers", dtype="fp16", inpaint=False, configs=TINY, overwrite=True,
            progress=False)


def test_convert_to_safetensors_round_trip(original, from_original, tmp_path):
    dst = tmp_path / "st"
    written = convert(original, dst, to="safetensors", dtype="fp32", progress=False)
    names = {str(p.relative_to(dst)) for p in written}
    assert {"decoder.safetensors", "inpainting.safetensors", "prior_fp16.safetensors", "movq_final.safetensors",
            "ViT-L-14.safetensors", "ViT-L-14_stats.safetensors", "text_encoder/model.safetensors",
            "text_encoder/config.json", "text_encoder/tokenizer.json", "clip_tokenizer/tokenizer.json"} <= names
    assert not any(p.suffix in (".ckpt", ".pt", ".th", ".bin") for p in written)
    dec, prior, inpaint = of.load_original(dst, configs=TINY)
    for a, b in ((dec, from_original[0]), (inpaint, from_original[2])):
        for name in ("unet", "movq", "text_encoder"):
            assert_same_tensors(getattr(a, name), getattr(b, name))
    for name in ("prior", "text_encoder", "image_encoder"):
        assert_same_tensors(getattr(prior, name), getattr(from_original[1], name))
    with pytest.raises(FileExistsError):
        convert(original, dst, to="safetensors", progress=False)

    one = convert(original / "ViT-L-14.pt", tmp_path / "clip.safetensors", to="safetensors", dtype="fp16",
                  progress=False)
    from safetensors.torch import load_file

    tensors = load_file(one[0])
    source = of.read_torchscript_tensors(original / "ViT-L-14.pt")
    assert tensors.keys() == source.keys()
    assert all(torch.equal(tensors[k], source[k].half()) for k in source if source[k].is_floating_point())
    stats = convert(original / "ViT-L-14_stats.th", tmp_path, to="safetensors", progress=False)[0]
    assert stats.name == "ViT-L-14_stats.safetensors" and set(load_file(stats)) == {"mean", "std"}


def test_pipeline_from_original_gives_same_images(original, ours):
    """`Kandinsky21.from_pretrained(original=...)` draws the same images as the diffusers-format load: ≤ 1e-4,
    or 10× the rounding floor the reference shows between 1 and 2 threads (tiny random models amplify ulps)."""
    from conftest import assert_matches

    from kandinsky import Kandinsky21

    pipe = Kandinsky21.from_pretrained(original=original, configs=TINY)
    kwargs = dict(width=64, height=64, steps=4, prior_steps=3, seed=3, output="np")
    assert_matches(pipe.text_to_image("a red circle", **kwargs), lambda: ours.text_to_image("a red circle", **kwargs))
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[8:40, 8:40] = 1
    img = PIL.Image.new("RGB", (64, 64), (30, 160, 90))
    # the original release has one MoVQ and one M-CLIP for both UNets; the tiny diffusers inpaint folder has its own
    import dataclasses

    d = ours.decoder
    shared = Kandinsky21(decoder=d, prior=ours.prior, inpaint=dataclasses.replace(
        ours.inpaint_model, movq=d.movq, text_encoder=d.text_encoder, tokenizer=d.tokenizer))
    assert_matches(pipe.inpaint(img, mask, "a red circle", **kwargs),
                   lambda: shared.inpaint(img, mask, "a red circle", **kwargs))
    with pytest.raises(ValueError, match="not both"):
        Kandinsky21.from_pretrained(decoder=original, original=original)


def test_clip_width_without_a_head_count_is_refused(original):
    """OpenAI builds width // 64 heads; a width 64 does not divide has no inferable head count: refuse it unless
    ``configs`` names one (the tiny CLIP here is 32 wide)."""
    with pytest.raises(ValueError, match=r"ViT-L-14\.pt.*CLIP text width 32 is not a multiple of 64.*clip_text"):
        of.load_original(original, configs={k: v for k, v in TINY.items() if k != "clip_text"})
    with pytest.raises(ValueError, match=r"positive divisor"):
        of.load_original(original, configs={**TINY, "clip_vision": {"num_attention_heads": 5}})


def test_refused_torchscript_is_not_read_again(tmp_path):
    """A refused TorchScript archive gives our error only: no torch.load retry (which would print torch's
    "dispatching to torch.jit.load" warning) through the CLIP-stats path of convert."""
    import os
    import pickle
    import warnings
    import zipfile

    from kandinsky.weights.convert import convert

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "ViT-L-14.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Payload(), protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/code/__torch__.py", "def forward(self):\n  pass\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="was refused"):
            convert(path, tmp_path / "out.safetensors", to="safetensors", progress=False)
        with pytest.raises(ValueError, match="TorchScript archive, not a CLIP stats file"):
            of.read_clip_stats(path)
    assert not (tmp_path / "out.safetensors").exists()
