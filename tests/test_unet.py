"""Decoder UNet: config parsing, state-dict layout and numerics against diffusers' UNet2DConditionModel."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from kandinsky.models import fastpath
from kandinsky.models import unet as unet_module
from kandinsky.models.unet import DecoderUNet, UNetCondition, UNetConfig

pytestmark = pytest.mark.usefixtures("fast_paths")  # every test with the CPU fast paths and without

TOL = 1e-5
TINY = {  # (block_out_channels, layers_per_block, attention_head_dim, cross_attention_dim, encoder_hid_dim)
    "two_levels": ((32, 64), 1, 8, 32, 48),
    "three_levels": ((32, 64, 96), 2, 16, 24, 40),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and one thread keeps the runs short and deterministic."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def diffusers_config(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=32,
                     encoder_hid_dim=48, in_channels=4, **overrides) -> dict:
    n = len(block_out_channels)
    config = dict(
        in_channels=in_channels, out_channels=8, block_out_channels=block_out_channels,
        layers_per_block=layers_per_block, attention_head_dim=attention_head_dim,
        cross_attention_dim=cross_attention_dim, encoder_hid_dim=encoder_hid_dim, norm_num_groups=8,
        encoder_hid_dim_type="text_image_proj", addition_embed_type="text_image",
        resnet_time_scale_shift="scale_shift", class_embed_type=None, sample_size=16,
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    )
    config.update(overrides)
    return config


def build_reference(seed: int = 0, **kwargs):
    """A tiny diffusers UNet with every parameter random (none left at 0 or 1)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**diffusers_config(**kwargs)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.1)
    return ref


def ours_from(ref) -> DecoderUNet:
    unet = DecoderUNet(UNetConfig.from_dict(dict(ref.config))).eval()
    unet.load_state_dict(ref.state_dict(), strict=True)
    return unet


def inputs(cfg: UNetConfig, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.cross_attention_dim, generator=g),  # CLIP image embedding
            torch.randn(batch, cfg.cross_attention_dim, generator=g),  # pooled text
            torch.randn(batch, 77, cfg.encoder_hid_dim, generator=g))  # text hidden states


def reference_out(ref, sample, t, image, pooled, hidden) -> torch.Tensor:
    added = {"text_embeds": pooled, "image_embeds": image}
    return ref(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


@pytest.fixture(scope="module", params=[(name, cin) for name in TINY for cin in (4, 9)],
                ids=lambda p: f"{p[0]}-in{p[1]}")
def pair(request):
    name, cin = request.param
    blocks, layers, head_dim, cross, hid = TINY[name]
    ref = build_reference(block_out_channels=blocks, layers_per_block=layers, attention_head_dim=head_dim,
                          cross_attention_dim=cross, encoder_hid_dim=hid, in_channels=cin)
    return ref, ours_from(ref)


# -- numerics -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(16, 16), (8, 24)], ids=["square", "wide"])
def test_matches_diffusers(pair, hw):
    ref, ours = pair
    cfg = ours.config
    image, pooled, hidden = inputs(cfg)
    sample = torch.randn(2, cfg.in_channels, *hw, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        cond = ours.prepare_condition(image, pooled, hidden)
        for t in (0, 999, torch.tensor(500), torch.tensor([3, 731])):
            expected = reference_out(ref, sample, t, image, pooled, hidden)
            got = ours(sample, t, cond)
            assert got.shape == (2, 8, *hw) and got.is_contiguous()
            assert (got - expected).abs().max().item() <= TOL, f"t={t}"
            assert expected.abs().max().item() > 0.1  # the comparison is not vacuous


def test_plain_pytorch_path_matches(pair):
    """With autograd on (training), the layers are plain PyTorch; same numbers, channels-last or not."""
    ref, ours = pair
    cfg = ours.config
    image, pooled, hidden = inputs(cfg)
    sample = torch.randn(2, cfg.in_channels, 16, 8)
    with torch.no_grad():
        expected = reference_out(ref, sample, 250, image, pooled, hidden)
    for channels_last in (True, False):
        ours.channels_last = channels_last
        try:
            with torch.enable_grad():
                got = ours(sample.requires_grad_(True), 250, ours.prepare_condition(image, pooled, hidden))
            assert got.requires_grad
            assert (got.detach() - expected).abs().max().item() <= TOL
        finally:
            ours.channels_last = None


def test_uncached_context_kv_and_batch_one(pair):
    ref, ours = pair
    cfg = ours.config
    image, pooled, hidden = inputs(cfg, batch=1)
    sample = torch.randn(1, cfg.in_channels, 8, 8)
    with torch.inference_mode():
        cached = ours.prepare_condition(image, pooled, hidden)
        uncached = ours.prepare_condition(image, pooled, hidden, cache_kv=False)
        assert uncached.kv is None and len(cached.kv) == len(list(ours.attention_layers()))
        a, b = ours(sample, 10, cached), ours(sample, 10, uncached)
        assert torch.equal(a, b)
        assert (a - reference_out(ref, sample, 10, image, pooled, hidden)).abs().max().item() <= TOL


def test_condition_layout(pair):
    ref, ours = pair
    cfg = ours.config
    image, pooled, hidden = inputs(cfg)
    with torch.inference_mode():
        cond = ours.prepare_condition(image, pooled, hidden)
        context = ref.encoder_hid_proj(hidden, image)
        emb_add = ref.add_embedding(pooled, image)
    assert isinstance(cond, UNetCondition)
    assert cond.context.shape == (2, 10 + 77, cfg.cross_attention_dim)
    assert cond.emb_add.shape == (2, cfg.time_embed_dim)
    assert (cond.context - context).abs().max().item() <= TOL
    assert (cond.emb_add - emb_add).abs().max().item() <= TOL


def test_batch_mismatch_raises(pair):
    _, ours = pair
    cfg = ours.config
    cond = ours.prepare_condition(*inputs(cfg, batch=1))
    with pytest.raises(ValueError, match="batch"):
        ours(torch.randn(2, cfg.in_channels, 8, 8), 5, cond)


# -- loading ------------------------------------------------------------------------------------------------


def test_state_dict_layout_identical(pair):
    ref, ours = pair
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert list(mine) == list(theirs)
    assert all(mine[k].shape == theirs[k].shape for k in theirs)
    assert not list(ours.buffers())


def test_meta_build_and_assign_load():
    ref = build_reference(seed=3)
    cfg = UNetConfig.from_dict(dict(ref.config))
    with torch.device("meta"):
        unet = DecoderUNet(cfg)
    assert all(p.is_meta for p in unet.parameters())
    unet.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, strict=True, assign=True)
    unet.eval().requires_grad_(False)
    image, pooled, hidden = inputs(cfg)
    sample = torch.randn(2, 4, 16, 16)
    with torch.inference_mode():
        got = unet(sample, 77, unet.prepare_condition(image, pooled, hidden))
        assert (got - reference_out(ref, sample, 77, image, pooled, hidden)).abs().max().item() <= TOL


def test_published_sizes():
    published = diffusers_config(block_out_channels=[384, 768, 1152, 1536], layers_per_block=3,
                                 attention_head_dim=64, cross_attention_dim=768, encoder_hid_dim=1024,
                                 norm_num_groups=32, norm_eps=1e-5, addition_embed_type_num_heads=64,
                                 class_embeddings_concat=None, mid_block_only_cross_attention=None,
                                 dual_cross_attention=False, time_embedding_type="positional",
                                 upcast_attention=False, use_linear_projection=False, sample_size=64,
                                 _class_name="UNet2DConditionModel", _diffusers_version="0.16.0.dev0")
    cfg = UNetConfig.from_dict(published)
    assert cfg == UNetConfig()
    assert cfg.time_embed_dim == 1536
    with torch.device("meta"):
        decoder = DecoderUNet(cfg)
        inpaint = DecoderUNet(UNetConfig.from_dict({**published, "in_channels": 9}))
    assert sum(p.numel() for p in decoder.parameters()) == 1_228_661_768
    assert sum(p.numel() for p in inpaint.parameters()) == 1_228_679_048
    heads = [a.heads for a in decoder.attention_layers()]
    assert heads == [12] * 3 + [18] * 3 + [24] * 3 + [24] + [24] * 4 + [18] * 4 + [12] * 4


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text"),
    ("addition_embed_type", None),
    ("encoder_hid_dim_type", "text_proj"),
    ("resnet_time_scale_shift", "default"),
    ("flip_sin_to_cos", False),
    ("freq_shift", 1),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("upcast_attention", True),
    ("only_cross_attention", True),
    ("cross_attention_norm", "layer_norm"),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("down_block_types", ("ResnetDownsampleBlock2D", "CrossAttnDownBlock2D")),
    ("down_block_types", ("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D")),
    ("up_block_types", ("SimpleCrossAttnUpBlock2D", "UpBlock2D")),
    ("up_block_types", ("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",)),
    ("time_embedding_type", "fourier"),
    ("time_embedding_dim", 256),
    ("act_fn", "gelu"),
    ("center_input_sample", True),
    ("resnet_out_scale_factor", 2.0),
    ("resnet_skip_time_act", True),
    ("conv_in_kernel", 1),
    ("attention_head_dim", [8, 8]),
    ("layers_per_block", [1, 2]),
    ("encoder_hid_dim", None),
    ("norm_num_groups", 12),
    ("attention_head_dim", 12),
])
def test_bad_config_names_the_key(key, value):
    config = diffusers_config()
    config[key] = value
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict(config)


def test_missing_switch_is_rejected():
    config = diffusers_config()
    del config["resnet_time_scale_shift"]  # diffusers' default is "default": another model
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        UNetConfig.from_dict(config)


# -- training -----------------------------------------------------------------------------------------------


def test_backward_and_gradient_checkpointing():
    ref = build_reference(seed=4, block_out_channels=(32, 64, 64), layers_per_block=1)
    unet = ours_from(ref).train()
    cfg = unet.config
    image, pooled, hidden = inputs(cfg)
    sample = torch.randn(2, 4, 8, 8)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        unet.gradient_checkpointing = checkpointing
        out = unet(sample, torch.tensor([10, 900]), unet.prepare_condition(image, pooled, hidden))
        out.square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters()}

    plain = grads(False)
    assert set(plain) == {n for n, _ in unet.named_parameters()}  # every parameter receives a gradient
    assert all(torch.isfinite(g).all() for g in plain.values())
    assert plain["conv_in.weight"].abs().sum() > 0
    assert plain["encoder_hid_proj.image_embeds.weight"].abs().sum() > 0
    assert plain["up_blocks.0.attentions.0.add_k_proj.weight"].abs().sum() > 0
    checkpointed = grads(True)
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], atol=1e-6, rtol=1e-4), name


# -- CPU fast path ------------------------------------------------------------------------------------------


def test_cpu_fast_path_follows_the_switch(fast_paths):
    """fp32 oneDNN kernels exist on every x86-64 CPU with a oneDNN build; the switch turns them off."""
    if fast_paths == "fast" and torch.backends.mkldnn.is_available():
        ok, why = fastpath.probe("conv", torch.float32)
        assert ok, f"the fp32 oneDNN conv self-check failed ({why}); CPU inference silently runs the slow path"
    ref = build_reference(seed=5)
    unet = ours_from(ref).requires_grad_(False)
    with torch.inference_mode():
        unet(torch.randn(2, 4, 8, 8), 1, unet.prepare_condition(*inputs(unet.config)))
    assert (unet.conv_in._packed is not None) == fastpath.usable("conv", torch.float32)


def test_packed_weights_follow_weight_and_shape_changes():
    ref = build_reference(seed=6)
    unet = ours_from(ref)
    cfg = unet.config
    image, pooled, hidden = inputs(cfg)
    with torch.inference_mode():
        unet(torch.randn(2, 4, 16, 16), 3, unet.prepare_condition(image, pooled, hidden))
    with torch.no_grad():  # in-place update (as an optimiser step would do) must invalidate the packed copies
        for (name, p), q in zip(unet.named_parameters(), ref.parameters(), strict=True):
            if name.endswith("weight") and p.dim() == 4:
                p.mul_(0.9)
                q.mul_(0.9)
    for hw in ((8, 8), (16, 8)):
        sample = torch.randn(2, 4, *hw)
        with torch.inference_mode():
            got = unet(sample, 3, unet.prepare_condition(image, pooled, hidden))
            assert (got - reference_out(ref, sample, 3, image, pooled, hidden)).abs().max().item() <= TOL
    unet.set_cpu_prepack(False)
    assert all(m._packed is None for m in unet.modules() if isinstance(m, unet_module.Conv2d))
    with torch.inference_mode():
        got = unet(sample, 3, unet.prepare_condition(image, pooled, hidden))
        assert (got - reference_out(ref, sample, 3, image, pooled, hidden)).abs().max().item() <= TOL


def test_copy_and_pickle_after_inference():
    ref = build_reference(seed=7)
    unet = ours_from(ref)
    cond = unet.prepare_condition(*inputs(unet.config))
    sample = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        expected = unet(sample, 5, cond)
    for clone in (copy.deepcopy(unet), pickle.loads(pickle.dumps(unet))):
        with torch.inference_mode():
            assert torch.equal(clone(sample, 5, cond), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu(dtype):
    ref = build_reference(seed=8)
    unet = ours_from(ref)
    image, pooled, hidden = inputs(unet.config)
    sample = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        expected = unet(sample, 5, unet.prepare_condition(image, pooled, hidden))
        unet.to(dtype)
        got = unet(sample.to(dtype), 5, unet.prepare_condition(image, pooled, hidden))
    assert got.dtype == dtype
    assert (got.float() - expected).abs().max().item() <= 0.05 * expected.abs().max().item()
