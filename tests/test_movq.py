"""MoVQ against diffusers' VQModel (test-time oracle only), plus config validation and the quantiser."""

from __future__ import annotations

import math

import pytest
import torch

from kandinsky.models.movq import MoVQ, MoVQConfig

diffusers = pytest.importorskip("diffusers")

TINY_CONFIGS = {
    "two_levels": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, norm_num_groups=8, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=16,
    ),
    "three_levels": dict(  # 3 latent channels, vq_embed_dim left to default, attention at two levels
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=2, norm_num_groups=32, latent_channels=3, num_vq_embeddings=32,
    ),
}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter random, non-trivial values at a scale that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def _pair(name: str, seed: int = 0) -> tuple[torch.nn.Module, MoVQ]:
    vq = diffusers.VQModel(norm_type="spatial", **TINY_CONFIGS[name]).eval()
    _randomize(vq, seed)
    model = MoVQ(MoVQConfig.from_dict(dict(vq.config))).eval()
    model.load_state_dict(vq.state_dict(), strict=True)
    return vq, model


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_state_dict_matches_diffusers(name: str) -> None:
    vq = diffusers.VQModel(norm_type="spatial", **TINY_CONFIGS[name])
    model = MoVQ(MoVQConfig.from_dict(dict(vq.config)))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in vq.state_dict().items()}
    assert ours == theirs
    assert "quantize.embedding.weight" in ours
    assert list(model.buffers()) == []


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("size", [(16, 16), (16, 24)])
def test_encode_decode_match_diffusers(name: str, size: tuple[int, int]) -> None:
    vq, model = _pair(name)
    f = model.config.downscale_factor
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, *size, generator=g) * 2 - 1
    z = torch.randn(2, model.config.latent_channels, size[0] // f, size[1] // f, generator=g)
    with torch.no_grad():
        latents = model.encode(x)
        ref_latents = vq.encode(x).latents
        image = model.decode(z)
        ref_image = vq.decode(z, force_not_quantize=True).sample
    assert latents.shape == (2, model.config.latent_channels, size[0] // f, size[1] // f)
    assert image.shape == (2, 3, *size)
    assert (latents - ref_latents).abs().max() <= 1e-5
    assert (image - ref_image).abs().max() <= 1e-5
    assert image.abs().max() > 0.1  # nothing trivially zero


def test_published_config_defaults() -> None:
    published = {
        "_class_name": "VQModel", "act_fn": "silu", "block_out_channels": [128, 256, 256, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                             "AttnDownEncoderBlock2D"],
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "norm_type": "spatial", "num_vq_embeddings": 16384, "out_channels": 3, "sample_size": 32,
        "scaling_factor": 0.18215,
        "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                           "UpDecoderBlock2D"],
        "vq_embed_dim": 4,
    }
    cfg = MoVQConfig.from_dict(published)
    assert cfg == MoVQConfig()
    assert cfg.downscale_factor == 8
    with torch.device("meta"):
        model = MoVQ(cfg)
    assert sum(p.numel() for p in model.parameters()) == 67_832_495  # SPEC 1.7


def test_meta_device_construction() -> None:
    vq, ref = _pair("two_levels")
    with torch.device("meta"):
        model = MoVQ(MoVQConfig.from_dict(dict(vq.config)))
    assert all(p.is_meta for p in model.parameters())
    model = model.to_empty(device="cpu")
    model.load_state_dict(vq.state_dict(), strict=True)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.decode(z), ref.decode(z))


@pytest.mark.parametrize("key, value", [
    ("norm_type", "group"),
    ("act_fn", "relu"),
    ("lookup_from_codebook", True),
    ("mid_block_add_attention", False),
    ("down_block_types", ["DownEncoderBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["AttnUpDecoderBlock2D", "UpBlock2D"]),
    ("vq_embed_dim", 8),
    ("_class_name", "AutoencoderKL"),
])
def test_bad_config_raises(key: str, value: object) -> None:
    d = dict(TINY_CONFIGS["two_levels"], norm_type="spatial", act_fn="silu")
    d[key] = value
    with pytest.raises(ValueError, match=key):
        MoVQConfig.from_dict(d)


def test_missing_norm_type_is_rejected() -> None:
    # diffusers' default norm_type is "group", which Kandinsky does not use
    with pytest.raises(ValueError, match="norm_type"):
        MoVQConfig.from_dict({"block_out_channels": [32, 64]})


def test_quantize_nearest_code_and_straight_through() -> None:
    vq, model = _pair("two_levels")
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 3, 5, generator=g, requires_grad=True)
    q = model.quantize(z)
    codebook = model.quantize.embedding.weight
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat, codebook.detach()).argmin(1).view(2, 3, 5)
    assert q.indices.dtype == torch.long and torch.equal(q.indices, expected)
    assert torch.allclose(q.z_q, model.quantize.lookup(expected), atol=1e-6)
    # same result and loss as diffusers (legacy weighting: commitment + 0.25 * codebook)
    ref_zq, ref_loss, (_, _, ref_idx) = vq.quantize(z.detach())
    assert torch.equal(ref_idx.view(2, 3, 5), q.indices)
    assert torch.allclose(ref_zq, q.z_q, atol=1e-6)
    assert torch.allclose(ref_loss, q.commitment_loss + 0.25 * q.codebook_loss, atol=1e-6)
    # straight-through: d z_q / d z is the identity; the codebook loss does not reach z
    w = torch.randn(q.z_q.shape, generator=g)
    (q.z_q * w).sum().backward(retain_graph=True)
    assert torch.allclose(z.grad, w)
    z.grad = None
    q.codebook_loss.backward(retain_graph=True)
    assert z.grad is None or torch.all(z.grad == 0)
    assert codebook.grad is not None and codebook.grad.abs().sum() > 0
    q.commitment_loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
