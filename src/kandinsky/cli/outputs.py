"""Where images go: ``--out`` as a file or a folder of numbered images, file-name-safe prompts, animations."""

from __future__ import annotations

import argparse
import io
import os
import re
from pathlib import Path
from typing import Any

from .. import metadata
from ..jobs import Job
from .common import CLIError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ANIMATION_SUFFIXES = (".gif", ".webp")


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^\w]+", "-", text.lower(), flags=re.UNICODE).strip("-_")
    return s[:limit].rstrip("-_") or "image"


def job_slug(job: Job) -> str:
    """The name part of a job's output files: its prompt, else its mode and item prompts."""
    if job.prompt:
        return slug(job.prompt)
    return slug("-".join([job.mode, *job.texts]))


def ensure_folder(folder: Path) -> Path:
    """Create ``folder`` if needed and check that it can be written to; temporary files that killed runs left
    there are removed (:func:`metadata.remove_stale`)."""
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"output folder {folder} is a file; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"output folder {folder} is not writable")
    metadata.remove_stale(folder)
    return folder


class Outputs:
    """Output names: ``--out`` a file (``NAME-2.png`` for further images) or a folder of numbered images."""

    def __init__(self, out: str | None, overwrite: bool = False, suffixes: tuple[str, ...] = IMAGE_SUFFIXES):
        self.path = Path(out) if out else Path("outputs")
        self.overwrite = overwrite
        self.is_file = self.path.suffix.lower() in suffixes
        self.folder = ensure_folder(self.path.parent if self.is_file else self.path)
        self._counter: int | None = None

    def next_number(self) -> int:
        """The next free number in the folder (one more than the highest ``NNNNN-`` name)."""
        if self._counter is None:
            found = [int(m.group(1)) for p in self.folder.iterdir() if (m := re.match(r"(\d+)-", p.name))]
            self._counter = max(found, default=0)
        self._counter += 1
        return self._counter

    def names(self, count: int, seed: int, name: str, suffix: str = ".png") -> list[Path]:
        """Paths for ``count`` images (refusing existing files unless overwriting)."""
        if self.is_file:
            p = self.path
            paths = [p] if count == 1 else [p.with_name(f"{p.stem}-{i + 1}{p.suffix}") for i in range(count)]
            for path in paths:
                if path.exists() and not self.overwrite:
                    raise FileExistsError(f"{path} already exists; pass --overwrite or choose another --out")
            return paths
        return [self.folder / f"{self.next_number():05d}-{seed}-{name}{suffix}" for _ in range(count)]


def morph_outputs(args: argparse.Namespace, job: Job) -> tuple[Path, Path | None]:
    """(animation file, frames folder or None) of a morph."""
    out = Path(args.out) if args.out else Path("outputs")
    suffix = out.suffix.lower()
    if suffix in ANIMATION_SUFFIXES:
        if args.format and f".{args.format}" != suffix:
            raise CLIError(f"--format {args.format} does not match --out {out}")
        ensure_folder(out.parent)
        anim, frames = out, (None if args.no_frames else out.with_name(f"{out.stem}-frames"))
    elif suffix:
        raise CLIError(f"morph --out must be a .gif or .webp file, or a folder; got {out}")
    else:
        folder = Outputs(str(out))
        sub = folder.folder / f"{folder.next_number():05d}-{job.seed}-{job_slug(job)}"
        anim = sub / f"morph.{args.format or 'gif'}"
        frames = None if args.no_frames else sub
    if not args.overwrite:
        if anim.exists():
            raise FileExistsError(f"{anim} already exists; pass --overwrite or choose another --out")
        if frames is not None and frames.is_dir() and any(frames.glob("frame-*.png")):
            raise FileExistsError(f"{frames} already holds frames; pass --overwrite or choose another --out")
    ensure_folder(anim.parent)
    if frames is not None:
        ensure_folder(frames)
    return anim, frames


def save_animation(frames: list[Any], path: Path, fps: float, boomerang: bool, overwrite: bool) -> Path:
    """An endlessly looping GIF or WebP of the frames."""
    seq = list(frames) + (list(reversed(frames[1:-1])) if boomerang else [])
    fmt = "WEBP" if path.suffix.lower() == ".webp" else "GIF"
    extra = {"quality": 90} if fmt == "WEBP" else {}
    buf = io.BytesIO()
    seq[0].save(buf, format=fmt, save_all=True, append_images=seq[1:], duration=round(1000 / fps), loop=0, **extra)
    try:
        metadata.write_atomic(path, buf.getvalue(), overwrite)  # whole or not at all
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass --overwrite or choose another --out") from None
    return path
