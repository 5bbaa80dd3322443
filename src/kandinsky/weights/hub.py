"""Hugging Face Hub repository ids as model folders, through ``huggingface_hub`` and its standard cache.

``resolve("kandinsky-community/kandinsky-2-1@REV")`` (or a shortcut such as ``"kandinsky-2-1"``) returns the
local snapshot folder. A snapshot already in the cache (``HF_HOME`` / ``HF_HUB_CACHE``) is used without any
network access; with ``HF_HUB_OFFLINE=1`` nothing else is tried, and a missing snapshot is a clear error that
says how to get it. Otherwise only the files the loader reads are downloaded (configs, tokenizer files, and per
component the weights file it would pick: ``.safetensors`` when the repository has one, never also the
``.bin``), with ``huggingface_hub``'s progress bars, resumable. ``huggingface_hub`` is the optional ``hub`` extra.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

# the official diffusers-format repositories, by role
REPOS = {"decoder": "kandinsky-community/kandinsky-2-1", "prior": "kandinsky-community/kandinsky-2-1-prior",
         "inpaint": "kandinsky-community/kandinsky-2-1-inpaint"}
SHORTCUTS = {name.split("/", 1)[1]: name for name in REPOS.values()}
_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_REVISION = re.compile(r"^[\w./-]{1,200}$")
# weights files the loaders look for, in their order of preference (weights.diffusers_format / io.find_weights)
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
SMALL_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizer vocabularies, sentencepiece models


class HubError(OSError):
    """A Hub id that cannot be resolved: not cached while offline, huggingface_hub missing, no such repo."""


def _offline() -> bool:
    """huggingface_hub's rule: ``HF_HUB_OFFLINE``, or when it is unset ``TRANSFORMERS_OFFLINE``, is true."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def parse(spec: str) -> tuple[str, str | None] | None:
    """``"owner/name[@revision]"`` or a shortcut -> (repo id, revision); None when ``spec`` is not a Hub id.

    A path that exists locally is never a Hub id.
    """
    if not isinstance(spec, str) or not spec or Path(spec).exists():
        return None
    name, _, revision = spec.partition("@")
    name = SHORTCUTS.get(name, name)
    if not _ID.match(name) or ".." in name or (revision and not _REVISION.match(revision)):
        return None
    if spec.startswith((".", "/", "~")):
        return None
    return name, revision or None


def is_hub_id(spec: Any) -> bool:
    return isinstance(spec, str) and parse(spec) is not None


def plan_files(files: Iterable[str]) -> list[str]:
    """The files of a repository listing that the loader reads: small files (configs, tokenizers) and, per
    folder, the one weights file it picks (``<stem>.safetensors`` before ``<stem>.bin``, stems in order)."""
    files = sorted(set(files))
    keep = [f for f in files if PurePosixPath(f).suffix in SMALL_SUFFIXES and not f.startswith(".")]
    folders: dict[str, set[str]] = {}
    for f in files:
        p = PurePosixPath(f)
        folders.setdefault(str(p.parent), set()).add(p.name)
    for folder, names in sorted(folders.items()):
        choice = next((f"{stem}{suffix}" for suffix in (".safetensors", ".bin") for stem in WEIGHT_STEMS
                       if f"{stem}{suffix}" in names), None)
        if choice is not None:
            keep.append(choice if folder == "." else f"{folder}/{choice}")
    return sorted(keep)


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401 - a submodule, not imported by the package itself
    except ImportError:
        raise HubError("Hugging Face Hub ids need the huggingface_hub package: pip install 'kandinsky[hub]'") from None
    return huggingface_hub


def cached(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (a branch, tag or commit), or None; never touches
    the network."""
    hub = _hub()
    try:
        folder = Path(hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (hub.errors.LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    return folder if (folder / "model_index.json").is_file() else None


def resolve(spec: str, *, revision: str | None = None, progress: bool = True, refresh: bool = False) -> Path:
    """The local folder of a Hub id (``owner/name[@revision]`` or a shortcut), downloading what is missing.

    A cached snapshot is used as it is, unless ``refresh`` (as ``kandinsky download`` does) asks the Hub for
    the revision's current files. Raises :class:`HubError` with what to do when it cannot.
    """
    parsed = parse(spec)
    if parsed is None:
        raise HubError(f"{spec!r} is neither a local folder nor a Hugging Face Hub id (owner/name[@revision])")
    repo_id, rev = parsed
    rev = revision or rev
    hub = _hub()
    where = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    if not refresh or _offline():
        folder = cached(repo_id, rev)
        if folder is not None:
            return folder
        if _offline():
            raise HubError(f"{repo_id}{'@' + rev if rev else ''} is not in the Hugging Face cache ({where}) and "
                           "HF_HUB_OFFLINE=1 forbids downloading it (nor is there a local folder named "
                           f"{spec!r}); run `kandinsky download` (or unset HF_HUB_OFFLINE) on a machine with "
                           "network access, or pass a local folder")
    try:
        api = hub.HfApi()
        files = plan_files(api.list_repo_files(repo_id, revision=rev))
        if "model_index.json" not in files:
            raise HubError(f"{repo_id} has no model_index.json: it is not a diffusers pipeline repository")
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if progress else disable_progress_bars)()
        return Path(hub.snapshot_download(repo_id, revision=rev, allow_patterns=files))
    except HubError:
        raise
    except hub.errors.RepositoryNotFoundError:
        raise HubError(f"{repo_id} was not found on the Hub (or needs a token: `hf auth login`), and there is no "
                       f"local folder named {spec!r}") from None
    except hub.errors.RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {rev!r}") from None
    except Exception as exc:  # noqa: BLE001 - network errors come from several libraries (httpx, requests, ...)
        raise HubError(f"cannot download {repo_id} from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
                       "with the files in the cache, HF_HUB_OFFLINE=1 uses them without the network") from None


def model_path(spec: str | os.PathLike | None, progress: bool = True) -> Path | None:
    """A model argument as a local folder: a path as it is, a Hub id resolved, None as None."""
    if spec is None:
        return None
    if isinstance(spec, str) and is_hub_id(spec):
        return resolve(spec, progress=progress)
    return Path(spec)
