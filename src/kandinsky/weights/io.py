"""Reading weight files safely, and filling modules from state dicts with errors that name the keys."""

from __future__ import annotations

import errno
import json
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".th")
CONVERT_MIN_BYTES = 64 << 20  # weights files from this size get a converted copy cached for other dtypes
CONVERTED_ENV = "KANDINSKY_CONVERTED_CACHE"  # "0": convert in memory at every load instead


def why_missing(path: Path, what: str = "file") -> str:
    """Why ``path`` cannot be opened as a ``what`` ("file" or "folder"): missing, a broken link, a link loop, or
    the other kind of entry; for error messages."""
    path = Path(path)
    for link in (path, *path.parents):  # the entry itself, or a folder on its way
        if not link.is_symlink():
            continue
        try:
            link.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 reports a loop this way
            return f"{link} is a symbolic link loop"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"{link} is a symbolic link loop"
            return f"{link} is a broken symbolic link (to {os.readlink(link)})"
    if what == "file" and path.is_dir():
        return f"{path} is a folder, expected a file"
    if what == "folder" and path.exists() and not path.is_dir():
        return f"{path} is a file, expected a folder"
    return f"missing {what}: {path}"


def read_json(path: Path) -> dict:
    """Load a JSON file, with an error that names the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(why_missing(path))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from ``.safetensors`` (memory-mapped) or a pickle-based file (``weights_only`` only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(why_missing(path, "weights file"))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{path} needs arbitrary code to unpickle and was refused ({exc}). If you trust it, convert it once "
                "in a trusted environment: `python -c \"import torch, safetensors.torch as st; "
                f"sd = torch.load('{path}', map_location='cpu', weights_only=False); "
                f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.with_suffix('.safetensors')}')\"`"
                " and use the .safetensors file."
            ) from exc
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError, IndexError, TypeError,
                AttributeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is truncated or corrupt: {exc}") from exc
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path} does not hold a flat state dict of tensors")
        return dict(obj)
    raise ValueError(f"unsupported weights file type {path.suffix!r} ({path}); use .safetensors or .bin")


def _cache_root() -> Path:
    base = os.environ.get("KANDINSKY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kandinsky")
    return Path(base)


def converted_path(path: Path, dtype: torch.dtype) -> Path:
    """Where the ``dtype`` copy of the weights file ``path`` is cached (keyed by its path, size and mtime)."""
    import hashlib

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}".encode()).hexdigest()[:20]
    return _cache_root() / "converted" / f"{path.stem[:60]}-{key}.{str(dtype).removeprefix('torch.')}.safetensors"


def load_file_as(path: Path, dtype: torch.dtype | None, device: torch.device | str = "cpu"
                 ) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` with floating ones in ``dtype`` where possible without holding them in anonymous
    memory: for a large file (:data:`CONVERT_MIN_BYTES`) whose floats are stored in another dtype, loaded on
    the CPU, a converted safetensors copy is written once to ``$KANDINSKY_CACHE/converted`` and memory-mapped
    from then on, so that its pages can be dropped and mapped back like the original's (``release_pages``).
    Falls back to the file itself (converted in memory by the caller) when the copy cannot be written
    (``KANDINSKY_CONVERTED_CACHE=0`` turns the copies off)."""
    path = Path(path)
    state = load_file(path)
    if (dtype is None or torch.device(device).type != "cpu"
            or os.environ.get(CONVERTED_ENV, "1").strip().lower() in ("0", "off", "false", "no")
            or path.stat().st_size < CONVERT_MIN_BYTES
            or all(v.dtype == dtype for v in state.values() if v.is_floating_point())):
        return state
    target = converted_path(path, dtype)
    if target.is_file():
        try:
            return load_file(target)
        except ValueError:
            target.unlink(missing_ok=True)  # a damaged copy: made again below
    from safetensors.torch import save_file

    from ..models.common import release_pages

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        converted = {}
        for k, v in state.items():  # the source's file pages go as soon as each tensor is converted
            converted[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
            release_pages([v])
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            save_file(converted, str(tmp), metadata={"source": str(path.resolve()), "dtype": str(dtype)})
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        del converted
        return load_file(target)
    except OSError:
        return state


def find_weights(folder: Path, stems: Iterable[str]) -> Path:
    """The weights file in ``folder``: ``<stem>.safetensors`` preferred over ``<stem>.bin``."""
    folder = Path(folder)
    stems = list(stems)
    for suffix in (".safetensors", ".bin"):
        for stem in stems:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
            if candidate.is_symlink() or candidate.is_dir():
                raise FileNotFoundError(why_missing(candidate))
    names = ", ".join(f"{s}.safetensors / {s}.bin" for s in stems)
    if not folder.is_dir():
        raise FileNotFoundError(why_missing(folder, "folder"))
    raise FileNotFoundError(f"no weights in {folder} (looked for {names})")


def fill_module(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, *,
                ignore: Callable[[str], bool] | None = None, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> nn.Module:
    """Load ``state`` into ``module`` (possibly built on the meta device) strictly.

    Keys for which ``ignore(key)`` is true are dropped first. Missing or unexpected keys, and shape
    mismatches, raise a ValueError naming them and ``source``. Floating tensors are cast to ``dtype``.
    Non-persistent index buffers left on the meta device (``position_ids``, ``token_type_ids``) are rebuilt.
    """
    state = {k: v for k, v in state.items() if not (ignore and ignore(k))}
    expected = module.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise ValueError(f"{source} does not match the model config: " + "; ".join(parts))
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
           for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{source} has tensors of the wrong shape: {_few(bad)}")
    converted = {}
    for k, v in state.items():
        target = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
        converted[k] = v.to(device=device, dtype=target).contiguous()
    from ..models.common import release_pages

    release_pages(v for k, v in state.items() if converted[k] is not v)  # the file pages of converted tensors
    module.load_state_dict(converted, strict=True, assign=True)
    _materialise_index_buffers(module, device)
    return module.eval().requires_grad_(False)


def _materialise_index_buffers(module: nn.Module, device: torch.device | str) -> None:
    for owner in module.modules():
        for name, buf in list(owner.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name == "position_ids":
                value = torch.arange(buf.shape[-1], device=device).expand(buf.shape).clone()
            elif name == "token_type_ids":
                value = torch.zeros(buf.shape, dtype=torch.long, device=device)
            else:
                raise RuntimeError(f"buffer {name!r} of {type(owner).__name__} was never initialised")
            owner.register_buffer(name, value, persistent=False)


def _few(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
