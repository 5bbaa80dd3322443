"""Speed and memory features: DeepCache, partial guidance, presets, low-memory mode, tiled MoVQ decoding,
the torch.compile fallback and the multistep solvers inside the pipeline. Tiny models only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_matches
from test_movq import TINY_CONFIGS, _randomize
from test_unet import build_reference, inputs, ours_from

from kandinsky.models.common import page_out
from kandinsky.models.movq import MoVQ, MoVQConfig, _tile_starts
from kandinsky.models.unet import DeepCache


@pytest.fixture(scope="module")
def unet():
    return ours_from(build_reference(block_out_channels=(32, 64, 96), layers_per_block=2, attention_head_dim=16,
                                     cross_attention_dim=24, encoder_hid_dim=40))


@pytest.mark.parametrize("depth", [1, 2])
def test_deep_cache_reuses_the_deep_features(unet, depth):
    """A cheap call at the same input as the full call that filled the cache reproduces the full output."""
    image, pooled, hidden = inputs(unet.config)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        cond = unet.prepare_condition(image, pooled, hidden)
        full = unet(x, 500, cond)
        cache = DeepCache(interval=3, depth=depth)
        first = unet(x, 500, cond, cache=cache)
        cheap = unet(x, 500, cond, cache=cache)
        other = unet(x + 0.5, 400, cond, cache=cache)  # a cheap call at another input differs
        assert cache.calls == 3 and cache.next_is_full()  # every third call is a full one
        assert torch.equal(unet(x, 500, cond, cache=cache), full)
        assert cache.calls == 4 and not cache.next_is_full()
    assert torch.equal(first, full)
    assert torch.allclose(cheap, full, atol=1e-5)
    assert not torch.allclose(other, full, atol=1e-3)
    with pytest.raises(ValueError, match="interval"):
        DeepCache(interval=0)


def test_deep_cache_after_guidance_stops(unet):
    """A cache filled at the guided batch (uncond + cond) serves later conditional-only calls."""
    image, pooled, hidden = inputs(unet.config)
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        cond = unet.prepare_condition(image, pooled, hidden)
        cache = DeepCache(interval=2)
        unet(torch.cat([x, x]), 300, cond, cache=cache)
        cheap = unet(x, 300, cond.rows(slice(1, None)), cache=cache)
        full = unet(torch.cat([x, x]), 300, cond)[1:]
    assert torch.allclose(cheap, full, atol=1e-5)


def test_condition_rows(unet):
    image, pooled, hidden = inputs(unet.config)
    x = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        cond = unet.prepare_condition(image, pooled, hidden)
        both = unet(x, 100, cond)
        second = unet(x[1:], 100, cond.rows(slice(1, None)))
    assert torch.allclose(both[1:], second, atol=1e-5)


def test_compile_failure_falls_back_to_eager(unet, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    image, pooled, hidden = inputs(unet.config)
    x = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        cond = unet.prepare_condition(image, pooled, hidden)
        expected = unet(x, 10, cond)
        unet.set_compile(True)
        with pytest.warns(RuntimeWarning, match="compile"):
            got = unet(x, 10, cond)
    assert unet._compiled is None and torch.equal(got, expected)


def test_page_out_keeps_values(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"w": torch.randn(300, 1000)}, str(tmp_path / "w.safetensors"))
    mapped = load_file(str(tmp_path / "w.safetensors"))["w"]
    anonymous = torch.randn(300, 1000)
    before = (mapped.clone(), anonymous.clone())
    page_out([mapped, anonymous, torch.zeros(0)])
    assert torch.equal(mapped, before[0]) and torch.equal(anonymous, before[1])


# -- tiled MoVQ decoding -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def movq():
    model = MoVQ(MoVQConfig(**TINY_CONFIGS["two_levels"])).eval()
    _randomize(model, 0)
    return model


def test_tile_starts_cover_with_overlap():
    for size, tile, overlap in ((40, 16, 4), (17, 16, 4), (64, 64, 16), (100, 32, 8)):
        starts = _tile_starts(size, tile, overlap)
        assert starts[0] == 0 and min(starts[-1] + tile, size) == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_tiled_decode(movq):
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = movq.decode(z)
        assert torch.equal(movq.decode_tiled(z, tile=64), full)  # one tile: the plain decode
        tiled = movq.decode_tiled(z, tile=16, overlap=6)
    assert tiled.shape == full.shape
    # tiles normalise and attend on their own, so values differ (a lot for a random model), but smoothly: no
    # column of the tiled image (tile borders included) changes more sharply than the plain decode's do
    assert torch.corrcoef(torch.stack([full.flatten(), tiled.flatten()]))[0, 1] > 0.6
    step = (tiled[..., 1:] - tiled[..., :-1]).abs().mean(dim=(0, 1, 2))
    plain = (full[..., 1:] - full[..., :-1]).abs().mean(dim=(0, 1, 2))
    assert step.max() < 1.2 * plain.max()


# -- pipeline ------------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _embeds(prior_pipe):
    out = prior_pipe[0]("a red circle", num_inference_steps=3, generator=_gen(5))
    return out.image_embeds, out.negative_image_embeds


class _UniPC:
    """diffusers' KandinskyPipeline passes ``generator=`` to ``step``, which UniPC does not take."""

    @staticmethod
    def make(**kw):
        from diffusers import UniPCMultistepScheduler

        class Scheduler(UniPCMultistepScheduler):
            def step(self, *args, generator=None, **kwargs):
                return super().step(*args, **kwargs)

        return Scheduler(**kw)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "unipc"])  # the others: test_diffusion.py
def test_solvers_in_the_pipeline_match_diffusers(ours, decoder_pipe, prior_pipe, sampler):
    from diffusers import DPMSolverMultistepScheduler

    emb, neg = _embeds(prior_pipe)
    kw = dict(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas="karras" in sampler)
    scheduler = DPMSolverMultistepScheduler(**kw) if sampler.startswith("dpm") else _UniPC.make(**kw)
    pipe = decoder_pipe[0]
    old = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        got = ours.text_to_image("a red circle", image_embeds=emb, negative_image_embeds=neg, height=64, width=64,
                                 steps=4, sampler=sampler, seed=1, output="np")
        assert_matches(got, lambda: pipe("a red circle", image_embeds=emb, negative_image_embeds=neg, height=64,
                                         width=64, num_inference_steps=4, generator=_gen(1),
                                         output_type="np").images, 1e-4)
    finally:
        pipe.scheduler = old


def test_speed_options_off_are_the_default(ours, prior_pipe):
    emb, neg = _embeds(prior_pipe)
    kw = dict(image_embeds=emb, negative_image_embeds=neg, height=64, width=64, steps=5, seed=2, output="np")
    base = ours.text_to_image("a red circle", **kw)
    same = ours.text_to_image("a red circle", cfg_until=1.0, deep_cache=1, **kw)
    assert np.array_equal(base, same)
    partial = ours.text_to_image("a red circle", cfg_until=0.6, **kw)
    cached = ours.text_to_image("a red circle", deep_cache=2, **kw)
    for other in (partial, cached):
        assert other.shape == base.shape and np.isfinite(other).all() and not np.array_equal(other, base)
    for bad in (dict(cfg_until=0), dict(cfg_until=1.5), dict(deep_cache=0), dict(preset="warp")):
        with pytest.raises(ValueError):
            ours.text_to_image("a red circle", **{**kw, **bad})


def test_presets_fill_unset_arguments(ours):
    from kandinsky.pipeline import PRESETS

    fast = ours.resolve("decoder", preset="fast", steps=None, sampler=None, prior_steps=None, width=None)
    assert {k: fast[k] for k in ("steps", "sampler", "prior_steps")} == {
        k: PRESETS["fast"][k] for k in ("steps", "sampler", "prior_steps")}
    assert fast["width"] == 512
    assert ours.resolve("decoder", preset="fast", steps=3)["steps"] == 3  # explicit arguments win
    assert ours.resolve("decoder", steps=None)["steps"] == 100


def test_low_memory_gives_the_same_images(ours, prior_pipe, decoder_pipe, inpaint_pipe):
    from kandinsky import Kandinsky21

    lean = Kandinsky21.from_pretrained(decoder=decoder_pipe[1], prior=prior_pipe[1], low_memory=True)
    assert lean.low_memory and not ours.low_memory
    kw = dict(height=64, width=64, steps=3, prior_steps=3, seed=4, num_images=2, output="np")
    expected = ours.text_to_image("a red circle", **kw)
    got = lean.text_to_image("a red circle", **kw)
    assert np.allclose(got, expected, atol=1e-4)  # images decode one by one: rounding only
    tiled = Kandinsky21.from_pretrained(decoder=decoder_pipe[1], prior=prior_pipe[1], tile_decode=True)
    assert np.allclose(tiled.text_to_image("a red circle", **kw), expected, atol=1e-4)  # one tile at 64²


def test_fast_preset_runs(ours):
    out = ours.text_to_image("a red circle", preset="fast", height=64, width=64, steps=3, prior_steps=2, seed=0,
                             output="pil")
    from kandinsky.pipeline import PRESETS

    assert out[0].size == (64, 64) and out[0].info["kandinsky"]["sampler"] == PRESETS["fast"]["sampler"]


def test_cli_fast_and_low_memory(capsys, prior_pipe, decoder_pipe, tmp_path, monkeypatch):
    """``--fast`` records the preset's explicit values; ``--low-memory --tile-decode on`` loads and runs."""
    from kandinsky import cli, metadata
    from kandinsky.pipeline import PRESETS

    monkeypatch.chdir(tmp_path)
    models = ["--model", str(decoder_pipe[1]), "--prior", str(prior_pipe[1])]
    argv = ["generate", "a red circle", "--seed", "3", "-W", "64", "-H", "64", "--quiet", *models]
    assert cli.main([*argv, "--fast", "--steps", "2", "--prior-steps", "2", "-o", "fast.png"]) == 0
    record = metadata.read_record(tmp_path / "fast.png")
    assert record["sampler"] == PRESETS["fast"]["sampler"] and record["steps"] == 2
    assert cli.main([*argv, "--steps", "2", "--prior-steps", "2", "--low-memory", "--tile-decode", "on",
                     "-o", "lean.png"]) == 0
    assert (tmp_path / "lean.png").is_file()
    capsys.readouterr()
