"""MoVQ against diffusers' VQModel (test-time oracle only), plus config validation and the quantiser."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kandinsky.models import fastpath
from kandinsky.models import movq as movq_module
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


def _inputs(model: MoVQ, size: tuple[int, int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    f = model.config.downscale_factor
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, *size, generator=g) * 2 - 1
    z = torch.randn(2, model.config.latent_channels, size[0] // f, size[1] // f, generator=g)
    return x, z


def _ref_decode(vq: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    return vq.decode(z, force_not_quantize=True).sample


def _tolerance(ref: torch.Tensor) -> float:
    """1e-5 of the output's scale: float32 rounding, which the fast route (other summation orders in the
    channels-last convs and the fused norms) rearranges; the plain route follows diffusers op for op."""
    return 1e-5 * max(1.0, float(ref.abs().max()))


@pytest.fixture
def routes(monkeypatch):
    """Counts the encoder / decoder calls that took the fast CPU route."""
    taken = {"encoder": 0, "decoder": 0}
    for name, cls in (("encoder", movq_module.Encoder), ("decoder", movq_module.Decoder)):
        def counted(self, *args, _orig=cls.fast, _name=name):
            taken[_name] += 1
            return _orig(self, *args)
        monkeypatch.setattr(cls, "fast", counted)
    return taken


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("size", [(16, 16), (16, 24)])
def test_encode_decode_match_diffusers(name: str, size: tuple[int, int], fast_paths: str, routes: dict) -> None:
    vq, model = _pair(name)
    f = model.config.downscale_factor
    x, z = _inputs(model, size)
    with torch.no_grad():
        latents = model.encode(x)
        ref_latents = vq.encode(x).latents
        image = model.decode(z)
        ref_image = vq.decode(z, force_not_quantize=True).sample
    assert routes == ({"encoder": 1, "decoder": 1} if fast_paths == "fast" else {"encoder": 0, "decoder": 0})
    assert latents.shape == (2, model.config.latent_channels, size[0] // f, size[1] // f)
    assert image.shape == (2, 3, *size)
    if fast_paths == "fast":  # channels-last inside, NCHW out
        assert latents.is_contiguous() and image.is_contiguous()
    assert (latents - ref_latents).abs().max() <= _tolerance(ref_latents)
    assert (image - ref_image).abs().max() <= _tolerance(ref_image)
    assert image.abs().max() > 0.1  # nothing trivially zero
    if fast_paths == "plain":  # the plain route is diffusers' computation
        assert torch.equal(image, ref_image) and torch.equal(latents, ref_latents)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_fast_route_as_accurate_as_diffusers(name: str) -> None:
    """Against a float64 run of diffusers, the fast route's float32 error is of the order of diffusers' own."""
    vq, model = _pair(name)
    vq64 = copy.deepcopy(vq).double()
    worst = {"encode": 0.0, "decode": 0.0}
    for seed in range(3):
        x, z = _inputs(model, (16, 24), seed)
        with torch.no_grad():
            exact = {"encode": vq64.encode(x.double()).latents, "decode": _ref_decode(vq64, z.double())}
            ref = {"encode": vq.encode(x).latents, "decode": _ref_decode(vq, z)}
            ours = {"encode": model.encode(x), "decode": model.decode(z)}
        for k in worst:
            err = float((ours[k].double() - exact[k]).abs().max())
            worst[k] = max(worst[k], err / float((ref[k].double() - exact[k]).abs().max()))
    assert worst["encode"] < 5 and worst["decode"] < 5, worst


def test_fast_route_matches_float64() -> None:
    """In float64 the fast route's algebra (norm statistics, latent-resolution modulation, transposed-conv
    upsampling, fused residuals) equals diffusers' to rounding: no approximation anywhere."""
    vq, model = _pair("three_levels")
    vq64, model64 = copy.deepcopy(vq).double(), copy.deepcopy(model).double()
    x, z = _inputs(model, (16, 24))
    with torch.no_grad():
        assert torch.allclose(model64.encode(x.double()), vq64.encode(x.double()).latents, rtol=0, atol=1e-11)
        assert torch.allclose(model64.decode(z.double()), _ref_decode(vq64, z.double()), rtol=0, atol=1e-11)


def test_fused_norm_and_upsample_equal_the_plain_layers() -> None:
    torch.manual_seed(0)
    norm = movq_module.SpatialNorm(64, 4).double()
    group = movq_module.GroupNorm(8, 64, eps=1e-6).double()
    up = movq_module.Upsample(64).double()
    _randomize(norm, 1), _randomize(group, 2), _randomize(up, 3)
    cl = torch.channels_last
    with torch.no_grad():
        for size in ((16, 24), (5, 7)):  # whole latent cells of 4x4, and a size that is not (interpolated)
            x = (3 * torch.randn(2, 64, *size, dtype=torch.float64) + 1).contiguous(memory_format=cl)
            zq = torch.randn(2, 4, 4, 6, dtype=torch.float64)
            latent = movq_module._Latent(zq, [norm])
            for silu in (False, True):
                want = norm(x, zq)
                want = torch.nn.functional.silu(want) if silu else want
                got = movq_module._norm_act(norm, x, latent, silu=silu)
                assert got.is_contiguous(memory_format=cl) and torch.allclose(got, want, rtol=0, atol=1e-12)
            out = torch.empty_like(x)  # into a given buffer
            got = movq_module._norm_act(group, x, None, silu=True, out=out)
            assert got.data_ptr() == out.data_ptr()
            assert torch.allclose(got, torch.nn.functional.silu(group(x)), rtol=0, atol=1e-12)
        x = torch.randn(2, 64, 5, 7, dtype=torch.float64).contiguous(memory_format=cl)
        assert torch.allclose(up.fast(x), up(x), rtol=0, atol=1e-12)


def test_fast_route_without_onednn_convs(monkeypatch) -> None:
    """Where the probe finds no oneDNN conv kernel for the dtype, the fast route runs plain convs, same result."""
    vq, model = _pair("three_levels")
    x, z = _inputs(model, (16, 24))
    usable = fastpath.usable
    monkeypatch.setattr(fastpath, "usable", lambda op, *a: op != "conv" and usable(op, *a))
    with torch.no_grad():
        ref = _ref_decode(vq, z)
        assert (model.decode(z) - ref).abs().max() <= _tolerance(ref)
        ref = vq.encode(x).latents
        assert (model.encode(x) - ref).abs().max() <= _tolerance(ref)


def test_fast_route_bfloat16() -> None:
    """bfloat16 takes the fast route too (native or emulated, by the probe): within bfloat16 rounding."""
    vq, model = _pair("three_levels")
    model = model.to(torch.bfloat16)
    x, z = _inputs(model, (16, 24))
    with torch.no_grad():
        for got, want in ((model.decode(z.bfloat16()), _ref_decode(vq, z)),
                          (model.encode(x.bfloat16()), vq.encode(x).latents)):
            assert got.dtype == torch.bfloat16
            assert (got.float() - want).abs().max() <= 5e-2 * want.abs().max()


def test_training_takes_the_plain_route(routes: dict) -> None:
    vq, model = _pair("two_levels")
    x, z = _inputs(model, (16, 16))
    model.train()
    out = model.decode(z)
    out.square().mean().backward()
    assert routes == {"encoder": 0, "decoder": 0}
    assert torch.equal(out.detach(), _ref_decode(vq, z).detach())
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_no_packed_weights_kept() -> None:
    """Each conv runs once per encode / decode: its packed copy is freed right after it ran (no lasting memory)."""
    _, model = _pair("two_levels")
    x, z = _inputs(model, (16, 16))
    convs = [m for m in model.modules() if isinstance(m, fastpath.Conv2d)]
    others_held = []  # when a conv packs its weight: how many other convs hold a packed copy
    original = fastpath.Conv2d._packed_weight

    def spy(self, shape):
        others_held.append(sum(c._packed is not None for c in convs if c is not self))
        return original(self, shape)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastpath.Conv2d, "_packed_weight", spy)
        model.decode(z), model.encode(x)
    if fastpath.usable("conv", torch.float32):
        assert others_held and max(others_held) == 0
    assert all(c._packed is None for c in convs)


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
