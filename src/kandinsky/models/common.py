"""Small pieces shared by the Kandinsky modules: config validation and the timestep sinusoid."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

_MISSING = object()


def config_value(config: Mapping[str, Any], key: str, default: Any = _MISSING, allowed: Iterable | None = None,
                 component: str = "model") -> Any:
    """Read ``key`` from a diffusers-style ``config.json`` mapping.

    A missing key takes ``default`` (or raises when there is none); a value outside ``allowed`` raises a
    ValueError that names the key, the value and what this implementation supports.
    """
    if key in config and config[key] is not None:
        value = config[key]
    elif default is not _MISSING:
        value = default
    else:
        raise ValueError(f"{component} config is missing required key {key!r}")
    if allowed is not None:
        allowed = list(allowed)
        if value not in allowed:
            raise ValueError(
                f"{component} config has {key}={value!r}, which Kandinsky 2.1 does not use; supported: {allowed}"
            )
    return value


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, cosine half first (diffusers ``flip_sin_to_cos=True``).

    Computed in float32 whatever the caller's dtype; ``timesteps`` is a 1-D tensor of shape (B,).
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


_MADV_PAGEOUT = 21  # Linux >= 5.4


def page_out(tensors: Iterable[torch.Tensor]) -> int:
    """Ask the OS to drop the resident pages of CPU tensors (``madvise(MADV_PAGEOUT)``); returns bytes advised.

    Made for weights memory-mapped from safetensors files: their pages are clean file pages, so they leave the
    process's resident memory at once and are read back (from the page cache, or the file) on next use; the
    values never change. Memory that is not file-backed stays as it is (without swap) or is swapped, never lost.
    A no-op where the call is not available (not Linux).
    """
    libc = _libc()
    if libc is None:
        return 0
    done = 0
    for start, end in _page_ranges(tensors):
        if libc.madvise(start, end - start, _MADV_PAGEOUT) == 0:
            done += end - start
    return done


def _page_ranges(tensors: Iterable[torch.Tensor]) -> Iterator[tuple[int, int]]:
    """The whole pages inside each distinct CPU storage of ``tensors``: (start, end) addresses, end > start."""
    page, seen = _page_size(), set()
    for t in tensors:
        if t.device.type != "cpu" or t.is_meta or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr in seen:
            continue
        seen.add(ptr)
        start, end = -(-ptr // page) * page, (ptr + size) // page * page
        if end > start:
            yield start, end


_MADV_DONTNEED = 4
_FILE_PAGE = 1 << 61  # /proc/self/pagemap: the page is a page of a file (not an anonymous copy-on-write copy)
_PRESENT, _SWAPPED = 1 << 63, 1 << 62


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's read-only or private file mappings (from /proc/self/maps)."""
    out = []
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[4] != "0" and parts[5].startswith("/"):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    out.append((start, end))
    except OSError:
        return []
    return out


def _all_file_pages(pagemap: Any, start: int, end: int, page: int) -> bool:
    """Whether every resident page in [start, end) is a clean page of the mapped file (no private copy made by a
    write, nothing swapped), read from /proc/self/pagemap."""
    import numpy as np

    pagemap.seek(start // page * 8)
    data = pagemap.read((end - start) // page * 8)
    if len(data) != (end - start) // page * 8:
        return False
    entries = np.frombuffer(data, dtype=np.uint64)
    present = (entries & np.uint64(_PRESENT)) != 0
    if bool(((entries & np.uint64(_SWAPPED)) != 0).any()):
        return False
    return bool(((entries[present] & np.uint64(_FILE_PAGE)) != 0).all())


def release_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident pages of CPU tensors memory-mapped from weight files, where that loses nothing.

    Only pages that are unmodified pages of the file are dropped (``madvise(MADV_DONTNEED)``): they leave the
    process's resident memory but stay in the OS page cache, so the next use maps them back cheaply (no disk
    read while memory is free). Tensors in anonymous memory (converted dtypes, computed buffers) and pages a
    write has copied are left alone. Returns the bytes dropped; a no-op off Linux.
    """
    libc = _libc()
    if libc is None:
        return 0
    mappings = _file_mappings()
    if not mappings:
        return 0
    page, done = _page_size(), 0
    try:
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError:
        return 0
    with pagemap:
        for start, end in _page_ranges(tensors):
            for m_start, m_end in mappings:
                lo, hi = max(start, m_start), min(end, m_end)
                if hi > lo and _all_file_pages(pagemap, lo, hi, page) \
                        and libc.madvise(lo, hi - lo, _MADV_DONTNEED) == 0:
                    done += hi - lo
    return done


def _page_size() -> int:
    import mmap

    return mmap.PAGESIZE


_LIBC: Any = False


def _libc() -> Any:
    global _LIBC
    if _LIBC is False:
        _LIBC = None
        try:
            import ctypes
            import sys

            if sys.platform.startswith("linux"):
                lib = ctypes.CDLL(None, use_errno=True)
                lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                lib.madvise.restype = ctypes.c_int
                _LIBC = lib
        except (OSError, AttributeError):
            _LIBC = None
    return _LIBC
