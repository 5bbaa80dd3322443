"""Image conversions between PIL / numpy and the tensors the models consume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = PIL.Image.Image | str | os.PathLike


MAX_PIXELS = 1 << 27  # 134 M pixels (e.g. 11585 x 11585): larger files are refused before decoding


def open_image(image: ImageInput, what: str = "image", max_pixels: int = MAX_PIXELS) -> PIL.Image.Image:
    """A PIL image from a PIL image or a file path, normalised by :func:`normalize_image`, with a clear error
    for anything else.

    Files are checked before their pixels are decoded: unreadable, truncated, and over ``max_pixels`` pixels
    (a decompression bomb: a small file whose header claims a huge image) raise ValueError naming the file.
    """
    if isinstance(image, PIL.Image.Image):
        return normalize_image(image, what)
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        try:
            with PIL.Image.open(path) as img:
                w, h = img.size
                if w < 1 or h < 1 or w * h > max_pixels:
                    raise ValueError(f"{what} {path} is {w}×{h} = {w * h} pixels, over the limit of {max_pixels}")
                img.load()
                return normalize_image(img, what)
        except PIL.Image.DecompressionBombError as exc:
            raise ValueError(f"{what} {path} is too large to decode safely ({exc})") from None
        except (PIL.UnidentifiedImageError, OSError, SyntaxError, EOFError) as exc:
            raise ValueError(f"cannot read {what} {path}: {exc}") from exc
    raise ValueError(f"{what} must be a PIL image or a file path, got {type(image).__name__}")


def normalize_image(img: PIL.Image.Image, what: str = "image") -> PIL.Image.Image:
    """The picture a person sees in ``img``, in a mode the models read: the first frame of an animation, EXIF
    orientation applied, 16-bit and float pixels scaled to 8 bits, CMYK/YCbCr/palette to RGB.

    Transparency: an image (``what`` != "mask") is composited over white; for a mask (white = repaint) a
    transparent pixel is "keep" (black), and the result is an ``L`` image. An RGB (or L, for masks) image
    without EXIF rotation is returned as it is.
    """
    if getattr(img, "is_animated", False) and img.tell() != 0:
        img.seek(0)
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    if orientation not in (None, 1):
        img = PIL.ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode != "F" and arr.max(initial=0) > 255:  # 16-bit samples
            arr = arr / 257.0
        img = PIL.Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8))
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if what == "mask":
        if has_alpha:
            rgba = img.convert("RGBA")
            mask = PIL.Image.new("L", img.size, 0)
            mask.paste(rgba.convert("L"), mask=rgba.getchannel("A"))  # transparent pixels = keep
            return mask
        return img if img.mode == "L" else img.convert("L")
    if has_alpha:
        rgba = img.convert("RGBA")
        white = PIL.Image.new("RGBA", img.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def clip_preprocess(images: list[PIL.Image.Image], config: dict[str, Any] | None = None) -> torch.Tensor:
    """CLIP preprocessing: shortest side to ``size`` (bicubic), centre crop, [0,1], normalise. (B, 3, S, S)."""
    config = config or {}
    size = config.get("size", 224)
    size = size.get("shortest_edge", 224) if isinstance(size, dict) else int(size)
    crop = config.get("crop_size", size)
    crop_h, crop_w = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
    mean = np.asarray(config.get("image_mean", CLIP_MEAN), dtype=np.float32)
    std = np.asarray(config.get("image_std", CLIP_STD), dtype=np.float32)
    resample = PIL.Image.Resampling(config.get("resample", PIL.Image.Resampling.BICUBIC))
    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        img = img.resize((new_w, new_h), resample=resample)
        top, left = int((new_h - crop_h) / 2), int((new_w - crop_w) / 2)
        arr = np.asarray(img)[top: top + crop_h, left: left + crop_w].astype(np.float32)
        arr = arr * np.float32(1 / 255)
        arr = (arr - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))
    return torch.stack(out)


def to_model_range(image: PIL.Image.Image, width: int, height: int) -> torch.Tensor:
    """Resize (bicubic, ``reducing_gap=1``) to (width, height), RGB, scale to [-1, 1]: (1, 3, H, W) float32."""
    img = image.convert("RGB").resize((width, height), resample=PIL.Image.Resampling.BICUBIC, reducing_gap=1)
    arr = np.asarray(img).astype(np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None] * 2.0 - 1.0


def to_inpaint_range(image: PIL.Image.Image, width: int, height: int) -> torch.Tensor:
    """As diffusers' inpaint pipeline prepares its image: bicubic resize, RGB, x / 127.5 - 1."""
    img = image.resize((width, height), resample=PIL.Image.Resampling.BICUBIC, reducing_gap=1).convert("RGB")
    arr = np.asarray(img)[None].transpose(0, 3, 1, 2)
    return torch.from_numpy(arr.copy()).to(torch.float32) / 127.5 - 1.0


def mask_to_tensor(mask: PIL.Image.Image | np.ndarray | torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A binary repaint mask (1 = repaint) of shape (1, 1, H, W).

    PIL masks are resized (Lanczos) to (width, height) and read as luminance / 255; arrays and tensors must
    already be H×W and in [0, 1]. Values >= 0.5 count as repaint.
    """
    if isinstance(mask, PIL.Image.Image):
        m = mask.resize((width, height), resample=PIL.Image.Resampling.LANCZOS).convert("L")
        arr = np.asarray(m).astype(np.float32) / 255.0
        t = torch.from_numpy(arr.copy())
    else:
        t = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask).float()
        t = t.squeeze()
        if t.ndim != 2:
            raise ValueError(f"mask must be a single H×W channel, got shape {tuple(t.shape)}")
        if tuple(t.shape) != (height, width):
            raise ValueError(f"mask is {t.shape[1]}×{t.shape[0]} but the image is {width}×{height}; "
                             "give a mask of the image's size")
        if t.min() < 0 or t.max() > 1:
            raise ValueError("mask values must be in [0, 1] (1 = repaint)")
    return (t >= 0.5).to(torch.float32)[None, None]


def dilate_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """Grow the holes (zeros) of a binary keep-mask (B, 1, h, w) by one latent pixel, as both upstreams do:
    towards up, left, up-left, down, right and down-right (not the anti-diagonal)."""
    hole = (keep != 1).to(keep.dtype)
    grown = hole.clone()
    # a hole at (i, j) clears (i+di, j+dj) for these offsets
    for di, dj in ((-1, 0), (0, -1), (-1, -1), (1, 0), (0, 1), (1, 1)):
        shifted = torch.zeros_like(hole)
        src_i = slice(max(-di, 0), hole.shape[2] - max(di, 0))
        dst_i = slice(max(di, 0), hole.shape[2] - max(-di, 0))
        src_j = slice(max(-dj, 0), hole.shape[3] - max(dj, 0))
        dst_j = slice(max(dj, 0), hole.shape[3] - max(-dj, 0))
        shifted[:, :, dst_i, dst_j] = hole[:, :, src_i, src_j]
        grown = torch.maximum(grown, shifted)
    return keep * (1 - grown)


def resize_mask_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, 1, H, W) mask to ``size`` = (h, w)."""
    return F.interpolate(mask, size, mode="nearest")


def postprocess(images: torch.Tensor, output: str) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    """Decoder output in [-1, 1] (B, 3, H, W) to ``"pil"``, ``"np"`` (B, H, W, 3 in [0, 1]) or ``"pt"`` (raw)."""
    if output == "pt":
        return images
    arr = (images * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    if output == "np":
        return arr
    return [PIL.Image.fromarray((a * 255).round().astype("uint8")) for a in arr]
