"""Images over HTTP: base64 uploads read safely (sizes checked before decoding), PNGs with metadata out."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from typing import Any

import PIL.Image
import PIL.ImageOps
import PIL.PngImagePlugin

from .. import metadata
from ..jobs import JobError
from .config import Limits

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_SPACE = re.compile(rb"\s+")


class FieldError(JobError):
    """A request field that cannot be used: answered 422 with the field's name and the reason (like any
    :class:`~kandinsky.jobs.JobError`); ``str()`` is ``"field: message"``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.args = (f"{field}: {message}",)


def decode_image(data: Any, field: str, limits: Limits) -> PIL.Image.Image:
    """A PIL image from base64 text (optionally a ``data:`` URL), refusing oversized ones before decoding.

    The encoded length, the file size and the width × height in the file header are checked against ``limits``
    before any pixel is decoded, so a small file that would expand to a huge image (a decompression bomb) is
    refused without allocating it.
    """
    if not isinstance(data, str) or not data:
        raise FieldError(field, "expected a base64-encoded image (PNG, JPEG or WebP)")
    text = _DATA_URL.sub("", data.strip(), count=1)
    if len(text) > 4 * math.ceil(limits.max_upload_bytes / 3) + 1024:
        raise FieldError(field, f"image is larger than the limit of {limits.max_upload_bytes} bytes")
    try:
        raw = base64.b64decode(_SPACE.sub(b"", text.encode("ascii")), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise FieldError(field, "is not valid base64") from None
    if len(raw) > limits.max_upload_bytes:
        raise FieldError(field, f"image is {len(raw)} bytes, over the limit of {limits.max_upload_bytes}")
    try:
        img = PIL.Image.open(io.BytesIO(raw))  # lazy: reads the header only
    except PIL.Image.DecompressionBombError:
        raise FieldError(field, f"image has more than {limits.max_upload_pixels} pixels") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise FieldError(field, "is not a readable image (expected PNG, JPEG, WebP, BMP or GIF)") from None
    if img.format not in FORMATS:
        raise FieldError(field, f"image format {img.format} is not accepted; use PNG, JPEG or WebP")
    w, h = img.size
    if w < 1 or h < 1 or w * h > limits.max_upload_pixels:
        raise FieldError(field, f"image is {w}×{h} = {w * h} pixels, over the limit of {limits.max_upload_pixels}")
    try:
        img.load()
        if img.format == "JPEG":
            img = PIL.ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise FieldError(field, f"image cannot be decoded ({exc})") from None
    return img


def decode_mask(data: Any, field: str, limits: Limits, size: tuple[int, int] | None, resize: bool = False
                ) -> PIL.Image.Image:
    """A mask (white = repaint) as an ``L`` image; of ``size``, or resized to it (nearest) when ``resize``."""
    img = decode_image(data, field, limits)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        mask = PIL.Image.new("L", img.size, 0)
        mask.paste(rgba.convert("L"), mask=rgba.getchannel("A"))  # transparent pixels = keep
    else:
        mask = img.convert("L")
    if size is not None and mask.size != size:
        if not resize:
            raise FieldError(field, f"mask is {mask.width}×{mask.height} but the image is {size[0]}×{size[1]}; "
                                    "give a mask of the image's size")
        mask = mask.resize(size, PIL.Image.Resampling.NEAREST)
    return mask


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not (isinstance(v, float) and not math.isfinite(v))}


def png_bytes(image: PIL.Image.Image, record: dict[str, Any] | None = None) -> bytes:
    """PNG bytes; with a record, the A1111 ``parameters`` text and the JSON record as the CLI writes them."""
    buf = io.BytesIO()
    info = None
    if record is not None:
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text(metadata.PARAMETERS_KEY, metadata.build_parameters(record))
        info.add_text(metadata.JSON_KEY, json.dumps(_json_safe(record), ensure_ascii=False))
    image.save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


def b64(data: bytes) -> str:
    """Base64 text of bytes."""
    return base64.b64encode(data).decode("ascii")
