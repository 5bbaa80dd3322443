"""Prior transformer vs diffusers' PriorTransformer (test-time oracle only), cached path, config checks."""

from __future__ import annotations

import pytest
import torch

from kandinsky.models.prior import PriorConfig, PriorTransformer

diffusers = pytest.importorskip("diffusers")

TINY_CONFIGS = {
    "small": dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12,
                  num_embeddings=7, additional_embeddings=4),
    "wider": dict(num_attention_heads=2, attention_head_dim=16, num_layers=3, embedding_dim=24,
                  num_embeddings=10, additional_embeddings=4, time_embed_dim=48),
}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random non-trivial values everywhere (positional/prd embeddings and clip_mean/std included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _pair(name: str, seed: int = 0) -> tuple[torch.nn.Module, PriorTransformer]:
    ref = diffusers.PriorTransformer(**TINY_CONFIGS[name]).eval()
    _randomize(ref, seed)
    model = PriorTransformer(PriorConfig.from_dict(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref, model


def _inputs(cfg: PriorConfig, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    d, n = cfg.embedding_dim, cfg.num_embeddings
    x_t = torch.randn(batch, d, generator=g)
    text_embeds = torch.randn(batch, d, generator=g)
    hidden = torch.randn(batch, n, d, generator=g)
    lengths = [n, 3, 1, 5][:batch]  # tokenizer masks: a prefix of ones, then padding
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return x_t, text_embeds, hidden, mask


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_state_dict_matches_diffusers(name: str) -> None:
    ref = diffusers.PriorTransformer(**TINY_CONFIGS[name])
    model = PriorTransformer(PriorConfig.from_dict(dict(ref.config)))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert ours["clip_mean"] == ours["clip_std"] == (1, model.config.embedding_dim)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("timestep", [0, 999, "tensor0d", "tensorB"])
def test_forward_matches_diffusers(name: str, timestep: object) -> None:
    ref, model = _pair(name)
    x_t, text_embeds, hidden, mask = _inputs(model.config)
    if timestep == "tensor0d":
        timestep = torch.tensor(417)
    elif timestep == "tensorB":
        timestep = torch.tensor([3, 250, 998])
    with torch.no_grad():
        expected = ref(x_t, timestep=timestep, proj_embedding=text_embeds, encoder_hidden_states=hidden,
                       attention_mask=mask).predicted_image_embedding
        out = model(x_t, timestep, text_embeds, hidden, mask)
        out_float_mask = model(x_t, timestep, text_embeds, hidden, mask.float())
    assert out.shape == (3, model.config.embedding_dim)
    assert (out - expected).abs().max() <= 1e-5
    assert torch.equal(out, out_float_mask)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_padding_is_masked(name: str) -> None:
    _, model = _pair(name)
    x_t, text_embeds, hidden, mask = _inputs(model.config)
    changed = hidden.clone()
    changed[~mask] = 100.0  # padded token states must not matter
    with torch.no_grad():
        diff = model(x_t, 5, text_embeds, hidden, mask) - model(x_t, 5, text_embeds, changed, mask)
    assert diff.abs().max() < 1e-5


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_cached_step_matches_forward(name: str) -> None:
    _, model = _pair(name)
    x_t, text_embeds, hidden, mask = _inputs(model.config)
    cond = model.prepare_condition(text_embeds, hidden, mask)
    assert len(cond.kv) == model.config.num_layers
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in (999, torch.tensor(500), torch.tensor([0, 10, 20])):
            x = torch.randn(x_t.shape, generator=g)
            full = model(x, t, text_embeds, hidden, mask)
            fast = model.step(x, t, cond)
            assert (full - fast).abs().max() <= 1e-5


def test_denormalize() -> None:
    _, model = _pair("small")
    x = torch.randn(2, model.config.embedding_dim)
    assert torch.allclose(model.denormalize(x), x * model.clip_std + model.clip_mean)


def test_published_config() -> None:
    published = {"_class_name": "PriorTransformer", "additional_embeddings": 4, "attention_head_dim": 64,
                 "dropout": 0.0, "embedding_dim": 768, "num_attention_heads": 32, "num_embeddings": 77,
                 "num_layers": 20}
    cfg = PriorConfig.from_dict(published)
    assert cfg == PriorConfig() and cfg.inner_dim == 2048 and cfg.num_tokens == 81
    with torch.device("meta"):
        model = PriorTransformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == 1_022_028_544 + 2 * 768  # SPEC 1.7 (+ clip_mean/std)


def test_meta_device_construction() -> None:
    ref, expected_model = _pair("small")
    with torch.device("meta"):
        model = PriorTransformer(PriorConfig.from_dict(dict(ref.config)))
    assert all(p.is_meta for p in model.parameters()) and list(model.buffers()) == []
    model = model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict(), strict=True)
    x_t, text_embeds, hidden, mask = _inputs(model.config)
    with torch.no_grad():
        out = model(x_t, 7, text_embeds, hidden, mask)
        assert torch.equal(out, expected_model(x_t, 7, text_embeds, hidden, mask))


@pytest.mark.parametrize("key, value", [
    ("time_embed_act_fn", "gelu"),
    ("norm_in_type", "layer"),
    ("embedding_proj_norm_type", "layer"),
    ("encoder_hid_proj_type", None),
    ("added_emb_type", None),
    ("additional_embeddings", 3),
    ("dropout", 0.1),
    ("_class_name", "UNet2DConditionModel"),
])
def test_bad_config_raises(key: str, value: object) -> None:
    d = dict(TINY_CONFIGS["small"])
    d[key] = value
    with pytest.raises(ValueError, match=key):
        PriorConfig.from_dict(d)
