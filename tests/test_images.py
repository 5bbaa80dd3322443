"""Hostile and odd image files through the Python entry points: used correctly or refused clearly."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from corpus import build

from kandinsky import Kandinsky21, imaging


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pipe():
    return Kandinsky21.from_pretrained()


def test_every_file_is_used_or_refused_with_its_name(corpus):
    for name, case in corpus.items():
        what = "mask" if case.mask else "image"
        if case.error is None:
            img = imaging.open_image(case.path, what)
            assert img.size == case.size, name
            assert img.mode == ("L" if case.mask else "RGB"), name
        else:
            with pytest.raises(ValueError, match=case.error) as info:
                imaging.open_image(case.path, what)
            assert name in str(info.value), name


def test_pixels_are_what_a_person_sees(corpus):
    gray16 = np.asarray(imaging.open_image(corpus["gray16.png"].path))
    raw = np.asarray(PIL.Image.open(corpus["gray16.png"].path)).astype(np.float64)
    np.testing.assert_allclose(gray16[..., 0], np.round(raw / 257), atol=1)  # 16-bit scaled, not clipped
    assert gray16.max() > 200
    alpha = np.asarray(imaging.open_image(corpus["alpha.png"].path)).astype(int)
    assert alpha[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert alpha[31, 0].tolist() == list(np.asarray(PIL.Image.open(corpus["alpha.png"].path))[31, 0, :3])
    pal = imaging.open_image(corpus["palette_transparent.png"].path)
    assert pal.mode == "RGB"
    gif = np.asarray(imaging.open_image(corpus["animated.gif"].path))
    webp = np.asarray(imaging.open_image(corpus["animated.webp"].path))
    for first in (gif, webp):  # the first frame (red), not the second (blue)
        assert first[..., 0].mean() > 200 and first[..., 2].mean() < 60
    rotated = imaging.open_image(corpus["exif_rotated.jpg"].path)
    plain = np.asarray(PIL.Image.open(corpus["exif_rotated.jpg"].path).convert("RGB").rotate(-90, expand=True))
    assert np.abs(np.asarray(rotated).astype(int) - plain.astype(int)).mean() < 3
    mask = np.asarray(imaging.open_image(corpus["mask_alpha.png"].path, "mask"))
    assert mask[0, 0] == 0 and mask[16, 24] == 255  # transparent = keep, opaque white = repaint


def test_the_bomb_is_refused_before_decoding(corpus, monkeypatch):
    def no_decode(self, *args, **kwargs):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ValueError, match="bomb.png (is 65535×65535|is too large)"):
        imaging.open_image(corpus["bomb.png"].path)


def test_pipeline_uses_odd_images_and_masks(corpus, pipe):
    kw = dict(width=64, height=64, steps=2, prior_steps=2, seed=1)
    for name in ("cmyk.jpg", "gray16.png", "alpha.png", "one_pixel.png", "animated.webp", "exif_rotated.jpg"):
        (out,) = pipe.img2img(corpus[name].path, "a red circle", strength=0.5, **kw)
        assert out.size == (64, 64) and out.mode == "RGB", name
    (out,) = pipe.variations(corpus["palette_transparent.png"].path, **{k: v for k, v in kw.items()
                                                                           if k != "prior_steps"})
    assert out.size == (64, 64)
    for mask in ("mask_alpha.png", "mask_rgb.png"):
        (out,) = pipe.inpaint(corpus["ok.png"].path, corpus[mask].path, "a blue square", **kw)
        assert out.size == (64, 64), mask
    alpha_mask = PIL.Image.open(corpus["mask_alpha.png"].path)  # a PIL mask with transparency: transparent = keep
    (same,) = pipe.inpaint(corpus["ok.png"].path, alpha_mask, "a blue square", **kw)
    (ref,) = pipe.inpaint(corpus["ok.png"].path, corpus["mask.png"].path, "a blue square", **kw)  # same box
    assert np.array_equal(np.asarray(same), np.asarray(ref))
    with pytest.raises(ValueError, match="mask is 24×16 but the image is 48×32"):
        pipe.inpaint(corpus["ok.png"].path, corpus["mask_other_size.png"].path, "x", **kw)
    with pytest.raises(ValueError, match="truncated.png"):
        pipe.img2img(corpus["truncated.png"].path, "x", **kw)
