"""Every public pipeline method against the matching diffusers call, seed for seed, on tiny random models."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import assert_matches

pytestmark = pytest.mark.usefixtures("fast_paths")  # every test with the CPU fast paths and without

EMB_TOL = 1e-4
IMG_TOL = 1e-4


def pair(out) -> tuple:
    return out.image_embeds, out.negative_image_embeds


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def sample_image(seed: int, w: int = 64, h: int = 64) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return PIL.Image.fromarray(base).resize((w, h), PIL.Image.Resampling.BILINEAR)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("negative", [None, "a blue square"])
@pytest.mark.parametrize("n", [1, 2])
def test_prior_embeds(ours, prior_pipe, seed, negative, n):
    got = ours.prior_embeds("a red circle", negative, steps=6, guidance_scale=4.0, seed=seed, num_images=n)
    assert_matches(tuple(got), lambda: pair(prior_pipe[0](
        "a red circle", negative_prompt=negative, num_inference_steps=6, num_images_per_prompt=n,
        generator=gen(seed), guidance_scale=4.0)), EMB_TOL)


@pytest.mark.parametrize("g", [1.0, 7.5])
def test_prior_embeds_batch_and_no_guidance(ours, prior_pipe, g):
    prompts = ["a red circle", "a big green star on a blue background"]
    got = ours.prior_embeds(prompts, steps=5, guidance_scale=g, seed=3)
    assert_matches(tuple(got), lambda: pair(prior_pipe[0](prompts, num_inference_steps=5, generator=gen(3),
                                                            guidance_scale=g)), EMB_TOL)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("negative", ["", "dog"])
def test_mix_embeds(ours, prior_pipe, seed, negative):
    img = sample_image(seed, 40, 56)
    items, weights = ["a red circle", img, "a blue square"], [0.3, 0.5, 0.2]
    got = ours.mix_embeds(items, weights, steps=5, seed=seed, negative_prompt=negative)
    assert got.image.shape == (1, got.image.shape[1])
    assert_matches(tuple(got), lambda: pair(prior_pipe[0].interpolate(
        items, weights, num_inference_steps=5, generator=gen(seed), negative_prompt=negative)), EMB_TOL)


def _embeds(prior_pipe, seed, rows=1):
    out = prior_pipe[0](["a red circle"] * rows, num_inference_steps=3, generator=gen(seed + 100))
    return out.image_embeds, out.negative_image_embeds


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
@pytest.mark.parametrize("seed", [0, 3])
def test_text_to_image_with_embeds(ours, decoder_pipe, prior_pipe, size, seed):
    h, w = size
    emb, neg = _embeds(prior_pipe, seed)
    got = ours.text_to_image("a red circle", image_embeds=emb, negative_image_embeds=neg, height=h, width=w,
                             steps=8, seed=seed, output="np")
    assert got.shape == (1, h, w, 3) and got.dtype == np.float32
    assert_matches(got, lambda: decoder_pipe[0](
        "a red circle", image_embeds=emb, negative_image_embeds=neg, height=h, width=w, num_inference_steps=8,
        generator=gen(seed), output_type="np").images, IMG_TOL)


def test_text_to_image_negative_prompt_and_batch(ours, decoder_pipe, prior_pipe):
    emb, neg = _embeds(prior_pipe, 1, rows=2)
    prompts = ["a red circle", "a green star"]
    got = ours.text_to_image(prompts, ["cat", "dog"], image_embeds=emb, negative_image_embeds=neg, height=64,
                             width=64, steps=5, num_images=2, seed=2, output="np")
    assert_matches(got, lambda: decoder_pipe[0](
        prompts, image_embeds=emb, negative_image_embeds=neg, negative_prompt=["cat", "dog"], height=64, width=64,
        num_inference_steps=5, num_images_per_prompt=2, generator=gen(2), output_type="np").images, IMG_TOL)


def test_text_to_image_ddpm(ours, decoder_pipe, prior_pipe):
    import tiny
    from diffusers import KandinskyPipeline

    base = decoder_pipe[0]
    pipe = KandinskyPipeline(text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                             scheduler=tiny.ddpm_scheduler(), movq=base.movq)
    pipe.set_progress_bar_config(disable=True)
    emb, neg = _embeds(prior_pipe, 4)
    got = ours.text_to_image("a red circle", image_embeds=emb, negative_image_embeds=neg, height=64, width=64,
                             steps=7, seed=4, sampler="ddpm", output="np")
    assert_matches(got, lambda: pipe("a red circle", image_embeds=emb, negative_image_embeds=neg, height=64,
                                     width=64, num_inference_steps=7, generator=gen(4), output_type="np").images,
                   IMG_TOL)


@pytest.mark.parametrize("seed", [0, 5])
def test_text_to_image_end_to_end(ours, decoder_pipe, prior_pipe, seed):
    """Without embeddings: the prior runs first and the same generator continues into the decoder."""

    def reference():
        g = gen(seed)
        prior_out = prior_pipe[0]("a red circle", negative_prompt="a cat", num_inference_steps=4, generator=g)
        return decoder_pipe[0]("a red circle", image_embeds=prior_out.image_embeds,
                               negative_image_embeds=prior_out.negative_image_embeds, height=64, width=64,
                               num_inference_steps=6, generator=g, output_type="np").images

    got = ours.text_to_image("a red circle", "a cat", prior_steps=4, steps=6, height=64, width=64, seed=seed,
                             output="np")
    assert_matches(got, reference, IMG_TOL)


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img(ours, decoder_pipe, prior_pipe, strength):
    from diffusers import KandinskyImg2ImgPipeline

    base = decoder_pipe[0]
    pipe = KandinskyImg2ImgPipeline(text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                                    scheduler=base.scheduler, movq=base.movq)
    pipe.set_progress_bar_config(disable=True)
    emb, neg = _embeds(prior_pipe, 6)
    img = sample_image(6)
    got = ours.img2img(img, "a red circle", image_embeds=emb, negative_image_embeds=neg, height=64, width=64,
                       steps=10, strength=strength, guidance_scale=7.0, seed=6, output="np")
    assert_matches(got, lambda: pipe("a red circle", image=img, image_embeds=emb, negative_image_embeds=neg,
                                     height=64, width=64, num_inference_steps=10, strength=strength,
                                     guidance_scale=7.0, generator=gen(6), output_type="np").images, IMG_TOL)


@pytest.mark.parametrize("seed", [0, 2])
def test_inpaint(ours, inpaint_pipe, prior_pipe, seed):
    emb, neg = _embeds(prior_pipe, seed)
    img = sample_image(seed)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:40, 20:52] = 255
    mask_img = PIL.Image.fromarray(mask)
    got = ours.inpaint(img, mask_img, "a red circle", image_embeds=emb, negative_image_embeds=neg, height=64,
                       width=64, steps=6, seed=seed, output="np")
    expected = assert_matches(got, lambda: inpaint_pipe[0](
        "a red circle", image=img, mask_image=mask_img, image_embeds=emb, negative_image_embeds=neg, height=64,
        width=64, num_inference_steps=6, generator=gen(seed), output_type="np").images, IMG_TOL)
    got_array_mask = ours.inpaint(img, (mask > 127).astype(np.float32), "a red circle", image_embeds=emb,
                                  negative_image_embeds=neg, height=64, width=64, steps=6, seed=seed, output="np")
    assert np.abs(got_array_mask - got).max() <= 1e-6
    assert expected.shape == got.shape


def test_mix_end_to_end(ours, decoder_pipe, prior_pipe):
    img = sample_image(9)

    def reference():
        g = gen(9)
        emb = prior_pipe[0].interpolate(["a red circle", img], [0.5, 0.5], num_inference_steps=4, generator=g)
        return decoder_pipe[0]("", image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds,
                               height=64, width=64, num_inference_steps=5, generator=g, output_type="np").images

    got = ours.mix(["a red circle", img], [0.5, 0.5], prior_steps=4, steps=5, height=64, width=64, seed=9,
                   output="np")
    assert_matches(got, reference, IMG_TOL)


def test_variations(ours, decoder_pipe, prior_pipe):
    img = sample_image(10, 72, 48)
    pipe = prior_pipe[0]

    def reference():
        image_emb = pipe.image_encoder(pipe.image_processor(img, return_tensors="pt").pixel_values).image_embeds
        return decoder_pipe[0]("", image_embeds=image_emb, negative_image_embeds=pipe.get_zero_embed(), height=64,
                               width=64, num_inference_steps=5, generator=gen(10), output_type="np").images

    got = ours.variations(img, steps=5, height=64, width=64, seed=10, output="np")
    assert_matches(got, reference, IMG_TOL)


def test_pil_output_and_metadata(ours, prior_pipe):
    emb, neg = _embeds(prior_pipe, 0)
    kwargs = dict(image_embeds=emb, negative_image_embeds=neg, height=64, width=64, steps=3, seed=11, num_images=2)
    images = ours.text_to_image("a red circle", **kwargs)
    assert len(images) == 2 and all(isinstance(i, PIL.Image.Image) and i.size == (64, 64) for i in images)
    assert images[0].info["kandinsky"]["seed"] == 11
    again = ours.text_to_image("a red circle", **kwargs)
    assert np.array_equal(np.asarray(images[1]), np.asarray(again[1]))


def test_non_square_img2img_and_inpaint(ours, prior_pipe):
    """diffusers swaps height and width in img2img (non-square fails there); ours keeps them apart."""
    emb, neg = _embeds(prior_pipe, 0)
    img = sample_image(1, 128, 64)
    out = ours.img2img(img, "x", image_embeds=emb, negative_image_embeds=neg, steps=4, seed=0, output="np")
    assert out.shape == (1, 64, 128, 3)
    mask = PIL.Image.new("L", (128, 64), 0)
    mask.paste(255, (10, 10, 50, 40))
    out = ours.inpaint(img, mask, "x", image_embeds=emb, negative_image_embeds=neg, steps=3, seed=0, num_images=2,
                       output="np")
    assert out.shape == (2, 64, 128, 3)
