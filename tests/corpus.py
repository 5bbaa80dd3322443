"""A corpus of hostile and odd image files for every image entry point (Python, CLI, HTTP API).

``build(folder)`` writes the files and returns ``{name: Case}``; a case is either usable (``error`` None, with
the size the picture has once EXIF orientation is applied) or refused with an error matching ``error``.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image


@dataclass
class Case:
    path: Path
    error: str | None = None  # a regex the error matches; None: the image is used
    size: tuple[int, int] | None = None  # (w, h) after EXIF orientation, for usable cases
    mask: bool = False  # meant as a mask


def _png(img: PIL.Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width × height pixels with almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _pattern(w: int = 48, h: int = 32) -> PIL.Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 90)], -1).astype(np.uint8)
    return PIL.Image.fromarray(arr)


def build(folder: Path) -> dict[str, Case]:
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}

    def add(name: str, data: bytes, **kw) -> None:
        path = folder / name
        path.write_bytes(data)
        cases[name] = Case(path, **kw)

    rgb = _pattern()
    png = _png(rgb)
    jpg = io.BytesIO()
    rgb.save(jpg, format="JPEG", quality=90)
    jpg = jpg.getvalue()
    add("ok.png", png, size=(48, 32))
    add("truncated.png", png[: len(png) // 2], error="cannot read|truncated|broken")
    add("truncated.jpg", jpg[: len(jpg) // 2], error="cannot read|truncated|broken")
    add("zero.png", b"", error="cannot read|not a readable")
    add("text.png", b"this is not an image\n", error="cannot read|not a readable")
    add("png_named.jpg", png, size=(48, 32))  # wrong extension: the content decides
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, format="JPEG")
    add("cmyk.jpg", buf.getvalue(), size=(48, 32))
    deep = (np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) * 42).astype(np.uint16)
    add("gray16.png", _png(PIL.Image.fromarray(deep)), size=(48, 32))
    pal = rgb.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    add("palette_transparent.png", _png(pal, transparency=0), size=(48, 32))
    rgba = rgb.convert("RGBA")
    alpha = np.zeros((32, 48), np.uint8)
    alpha[16:] = 255  # top half transparent, bottom half opaque
    rgba.putalpha(PIL.Image.fromarray(alpha))
    add("alpha.png", _png(rgba), size=(48, 32))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", exif=exif.tobytes())
    add("exif_rotated.jpg", buf.getvalue(), size=(32, 48))
    add("one_pixel.png", _png(PIL.Image.new("RGB", (1, 1), (200, 30, 30))), size=(1, 1))
    add("bomb.png", _bomb_png(65535, 65535), error="pixels, over the limit|too large|not a readable")
    frames = [PIL.Image.new("RGB", (40, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("animated.gif", buf.getvalue(), size=(40, 24))
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("animated.webp", buf.getvalue(), size=(40, 24))
    # masks (white = repaint)
    m = PIL.Image.new("L", (48, 32), 0)
    m.paste(255, (12, 8, 36, 24))
    add("mask.png", _png(m), size=(48, 32), mask=True)
    add("mask_other_size.png", _png(m.resize((24, 16))), size=(24, 16), mask=True)
    ma = PIL.Image.new("RGBA", (48, 32), (255, 255, 255, 0))  # white but transparent: keep everywhere ...
    ma.paste((255, 255, 255, 255), (12, 8, 36, 24))  # ... except an opaque white box: repaint
    add("mask_alpha.png", _png(ma), size=(48, 32), mask=True)
    add("mask_rgb.png", _png(m.convert("RGB")), size=(48, 32), mask=True)
    return cases
