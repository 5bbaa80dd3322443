"""Bad input raises a ValueError whose message says what to change."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from kandinsky import Kandinsky21

IMG = PIL.Image.new("RGB", (64, 64), (200, 30, 30))
SMALL = dict(steps=2, prior_steps=2, width=64, height=64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=60), "width must be a positive multiple of 8"),
    (dict(height=0), "height must be a positive multiple of 8"),
    (dict(steps=0), "steps must be between 1"),
    (dict(prior_steps=-1), "steps must be between 1"),
    (dict(sampler="euler_magic"), "unknown sampler 'euler_magic'; choose one of ddim"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a non-negative number"),
    (dict(num_images=0), "num_images must be a positive integer"),
    (dict(output="jpeg"), "output must be one of"),
    (dict(seed=-5), "seed must be a non-negative integer"),
])
def test_text_to_image_rejects(ours, kwargs, message):
    args = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        ours.text_to_image("a red circle", **args)


def test_prompt_types(ours):
    with pytest.raises(ValueError, match="prompt must be a string"):
        ours.text_to_image(None, **SMALL)
    with pytest.raises(ValueError, match="prompt must be a string"):
        ours.prior_embeds([])
    with pytest.raises(ValueError, match="negative_prompt has 2 entries but prompt has 3"):
        ours.prior_embeds(["a", "b", "c"], ["c", "d"], steps=2)


def test_mix_inputs(ours):
    with pytest.raises(ValueError, match="items is empty"):
        ours.mix_embeds([], [])
    with pytest.raises(ValueError, match="items has 2 entries but weights has 1"):
        ours.mix_embeds(["a", IMG], [1.0])
    with pytest.raises(ValueError, match="weights must be finite numbers"):
        ours.mix_embeds(["a"], ["heavy"])
    with pytest.raises(ValueError, match="mix items must be prompts"):
        ours.mix_embeds([42], [1.0])


def test_inpaint_mask_checks(ours):
    with pytest.raises(ValueError, match="mask is 32×32 but the image is 64×64"):
        ours.inpaint(IMG, PIL.Image.new("L", (32, 32)), "x", **SMALL)
    with pytest.raises(ValueError, match="mask is 32×64 but the image is 64×64"):
        ours.inpaint(IMG, np.zeros((64, 32)), "x", **SMALL)
    with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\]"):
        ours.inpaint(IMG, np.full((64, 64), 255.0), "x", **SMALL)


def test_img2img_checks(ours, tmp_path):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        ours.img2img(IMG, "x", strength=1.5, **SMALL)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        ours.img2img(tmp_path / "missing.png", "x", **SMALL)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        ours.img2img(bad, "x", **SMALL)


def test_embeds_shape_checks(ours):
    import torch

    with pytest.raises(ValueError, match="negative_image_embeds has shape"):
        ours.text_to_image("x", image_embeds=torch.zeros(2, 32), negative_image_embeds=torch.zeros(3, 32), **SMALL)
    with pytest.raises(ValueError, match="negative_image_embeds was given without image_embeds"):
        ours.text_to_image("x", negative_image_embeds=torch.zeros(1, 32), **SMALL)


def test_missing_component(decoder_pipe, prior_pipe):
    only_prior = Kandinsky21.from_pretrained(prior=prior_pipe[1])
    with pytest.raises(ValueError, match=r"needs the decoder model.*decoder=DIR"):
        only_prior.text_to_image("x", **SMALL)
    only_decoder = Kandinsky21.from_pretrained(decoder=decoder_pipe[1])
    with pytest.raises(ValueError, match="needs the inpaint model"):
        only_decoder.inpaint(IMG, IMG.convert("L"), "x", **SMALL)
    with pytest.raises(ValueError, match="needs the prior model"):
        only_decoder.prior_embeds("x")


def test_progress_reporting(ours):
    seen = []
    ours.set_progress(lambda stage, done, total: seen.append((stage, done, total)))
    try:
        ours.text_to_image("a red circle", **SMALL, seed=0)
    finally:
        ours.set_progress(False)
    assert seen == [("prior", 1, 2), ("prior", 2, 2), ("decoder", 1, 2), ("decoder", 2, 2)]
    with pytest.raises(ValueError, match="progress must be"):
        ours.set_progress("loud")
