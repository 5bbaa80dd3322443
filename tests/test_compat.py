"""compat="original": the ai-forever repository's sampling semantics, as an explicit opt-in."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from kandinsky import Kandinsky21
from kandinsky.diffusion.schedules import original_ddim_timesteps

pytestmark = pytest.mark.usefixtures("fast_paths")  # every test with the CPU fast paths and without

IMG = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def original(decoder_pipe, prior_pipe, inpaint_pipe):
    return Kandinsky21.from_pretrained(decoder=decoder_pipe[1], prior=prior_pipe[1], inpaint=inpaint_pipe[1],
                                       compat="original")


def _steps(pipe, fn):
    seen = []
    pipe.set_progress(lambda stage, done, total: seen.append((stage, total)))
    try:
        fn()
    finally:
        pipe.set_progress(False)
    return [t for stage, t in seen if stage == "decoder"]


def test_original_ddim_spacing():
    assert len(original_ddim_timesteps(75)) == 77 and len(original_ddim_timesteps(150)) == 167
    assert original_ddim_timesteps(100) == list(range(991, 0, -10))


def test_defaults_and_step_counts(original):
    steps = _steps(original, lambda: original.text_to_image("a red circle", width=64, height=64, steps=75,
                                                           prior_steps=2, sampler="ddim", seed=0, output="np"))
    assert set(steps) == {77}
    assert original.resolve("decoder", sampler=None, guidance_scale=None) == {"sampler": "p_sampler",
                                                                                "guidance_scale": 7.0}


def test_img2img_strength_is_fraction_kept(original, ours):
    def run(pipe, **kw):
        return _steps(pipe, lambda: pipe.img2img(IMG, "x", steps=100, prior_steps=2, seed=1, sampler="ddim",
                                                 output="np", **kw))

    assert len(run(original)) == 30  # strength 0.7 kept -> denoises 291, 281, ..., 1
    assert len(run(ours)) == 30  # diffusers' 0.3 denoised
    kw = dict(steps=20, prior_steps=2, seed=1, output="np")
    assert len(_steps(original, lambda: original.img2img(IMG, "x", strength=0.5, **kw))) == 10
    with pytest.raises(ValueError, match="fraction kept"):
        original.img2img(IMG, "x", strength=1.0, **kw)


def test_mask_means_keep_and_decoder_text_is_empty(original, ours):
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[10:40, 20:50] = 1
    kw = dict(steps=10, prior_steps=2, guidance_scale=4.0, sampler="ddim", seed=2, output="np")
    a = original.inpaint(IMG, 1 - mask, "a red circle", **kw)
    b = ours.inpaint(IMG, mask, "a red circle", **kw)
    assert np.abs(a - b).max() <= 1e-6

    texts = []
    parts = original.decoder
    real = original._decoder_text
    original._decoder_text = lambda p, prompts: texts.append(list(prompts)) or real(p, prompts)
    try:
        original.text_to_image("a red circle", "a cat", width=64, height=64, steps=2, prior_steps=2, seed=0)
    finally:
        del original._decoder_text
    assert texts == [["a red circle"], [""]] and parts is original.decoder


def test_p_sampler_inpaint_pastes_known_region(original):
    out = original.inpaint(IMG, np.ones((64, 64), dtype=np.float32), "x", steps=5, prior_steps=2, seed=3,
                           output="np")
    assert out.shape == (1, 64, 64, 3)


def test_bad_compat(decoder_pipe):
    with pytest.raises(ValueError, match="compat must be one of"):
        Kandinsky21.from_pretrained(decoder=decoder_pipe[1], compat="karlo")
