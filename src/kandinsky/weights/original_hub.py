"""The original Kandinsky 2.1 release by Hugging Face Hub id, and what the release fetches from elsewhere.

The ai-forever code (``kandinsky2.get_kandinsky2``) downloads ``decoder_fp16.ckpt`` (or ``inpainting_fp16.ckpt``),
``prior_fp16.ckpt``, ``movq_final.ckpt``, ``ViT-L-14_stats.th`` and the ``text_encoder/`` files from
``ai-forever/Kandinsky_2.1`` (formerly ``sberbank-ai/Kandinsky_2.1``), and OpenAI's CLIP ViT-L/14 through the
``clip`` package from its published location, whose tokenizer vocabulary ships inside that package. Here:

* :func:`resolve` turns ``"ai-forever/Kandinsky_2.1[@REV]"`` (or the shortcut ``"kandinsky-2-1-original"``) into
  the local snapshot folder through ``huggingface_hub``'s standard cache, downloading only the files the loader
  reads: the inpainting UNet (a UNet as large as the decoder's, which no other mode uses) only when asked
  for (``inpaint=True``).
* :func:`openai_clip` is ``ViT-L-14.pt`` from OpenAI's URL (the one the ``clip`` package uses; the URL holds the
  file's SHA-256, which is checked), kept in :func:`cache_dir`; a copy the ``clip`` package already downloaded
  (``~/.cache/clip``) is used when its checksum matches.
* :func:`clip_tokenizer` is the prior's CLIP tokenizer: OpenAI's BPE file from an installed ``clip`` or
  ``open_clip`` package, else the tokenizer files of ``openai/clip-vit-large-patch14`` (same vocabulary and ids)
  through the Hugging Face cache.

Offline is the contract: whatever is cached is used without touching the network; with ``HF_HUB_OFFLINE=1``
nothing else is tried and a missing file is a :class:`NotCached` error naming the command that fetches it
(``kandinsky download original``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .hub import REPOS, HubError, _hub, _offline
from .hub import parse as _parse_hub_id

ORIGINAL_REPO = "ai-forever/Kandinsky_2.1"
SHORTCUT = "kandinsky-2-1-original"
ALIASES = {SHORTCUT: ORIGINAL_REPO, "sberbank-ai/Kandinsky_2.1": ORIGINAL_REPO}  # the release code's old name
TEXT_ENCODER_FILES = ("config.json", "pytorch_model.bin", "sentencepiece.bpe.model", "special_tokens_map.json",
                      "tokenizer.json", "tokenizer_config.json")
# the files of the repository the loader reads, by the role of load_original's keyword that replaces them
ROLE_FILES: dict[str, tuple[str, ...]] = {
    "decoder": ("decoder_fp16.ckpt",), "prior": ("prior_fp16.ckpt",), "movq": ("movq_final.ckpt",),
    "clip_stats": ("ViT-L-14_stats.th",), "text_encoder": tuple(f"text_encoder/{n}" for n in TEXT_ENCODER_FILES),
}
INPAINT_FILE = "inpainting_fp16.ckpt"
# planned files a snapshot may lack and still load: the XLM-R tokenizer needs tokenizer.json or the sentencepiece
# model (either), and special_tokens_map.json repeats what tokenizer_config.json and the tokenizer class say
EITHER = {"text_encoder/tokenizer.json": "text_encoder/sentencepiece.bpe.model",
          "text_encoder/sentencepiece.bpe.model": "text_encoder/tokenizer.json"}
OPTIONAL = {"text_encoder/special_tokens_map.json"}

# OpenAI CLIP ViT-L/14 where the `clip` package gets it (clip/clip.py _MODELS); the folder name is the SHA-256
CLIP_SHA256 = "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"
CLIP_URL = f"https://openaipublic.azureedge.net/clip/models/{CLIP_SHA256}/ViT-L-14.pt"
CLIP_FILE = "ViT-L-14.pt"
OTHER_CLIP_CACHES = ("~/.cache/clip",)  # where the `clip` package keeps what it downloaded
BPE_PACKAGES = ("clip", "open_clip")  # packages that ship bpe_simple_vocab_16e6.txt.gz next to their __init__
CLIP_TOKENIZER_REPO = "openai/clip-vit-large-patch14"
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json")
DOWNLOAD = "kandinsky download original"


class NotCached(HubError, FileNotFoundError):
    """A file the original release needs is neither cached nor allowed to be downloaded (``HF_HUB_OFFLINE=1``)."""


def _offline_hint() -> str:
    return (f"run `{DOWNLOAD}` on a machine with network access (it fills the same caches; or unset "
            "HF_HUB_OFFLINE)")


def _hf_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"


# ================================================================================================================
# the release repository


def parse(spec: Any) -> tuple[str, str | None] | None:
    """``"owner/name[@revision]"`` or the shortcut -> (repo id, revision); None when ``spec`` is no Hub id (an
    existing local path never is) or names a diffusers-format repository. ``kandinsky-2-1-original`` and the old
    ``sberbank-ai/Kandinsky_2.1`` mean ``ai-forever/Kandinsky_2.1``; another ``owner/name`` is taken as a copy of
    the release."""
    if not isinstance(spec, str) or not spec or Path(spec).exists():
        return None
    name, _, revision = spec.partition("@")
    parsed = _parse_hub_id(ALIASES.get(name, name) + (f"@{revision}" if revision else ""))
    return None if parsed is None or parsed[0] in REPOS.values() else parsed


def is_hub_id(spec: Any) -> bool:
    return parse(spec) is not None


def check_spec(spec: str) -> tuple[str, str | None]:
    """:func:`parse`, or a :class:`HubError` saying what ``spec`` is instead."""
    parsed = parse(spec)
    if parsed is not None:
        return parsed
    diffusers = _parse_hub_id(spec) if isinstance(spec, str) else None
    if diffusers is not None:
        raise HubError(f"{diffusers[0]} is a diffusers-format repository, not the original release: load it with "
                       "decoder=/prior=/inpaint= (--model/--prior/--inpaint), or give original= "
                       f"{ORIGINAL_REPO} (shortcut {SHORTCUT})")
    raise HubError(f"{spec!r} is neither a local folder nor a Hugging Face Hub id (owner/name[@revision], or "
                   f"{SHORTCUT})")


def plan(inpaint: bool = False, skip: Iterable[str] = ()) -> list[str]:
    """The repository files the loader reads: every role's except those in ``skip`` (given as files of their
    own), and the inpainting UNet only with ``inpaint``."""
    skip = set(skip)
    files = [f for role, names in ROLE_FILES.items() if role not in skip for f in names]
    return sorted(files + ([INPAINT_FILE] if inpaint else []))


def missing(folder: Path, files: Iterable[str]) -> list[str]:
    """The planned ``files`` the loader would miss in ``folder`` (:data:`EITHER`, :data:`OPTIONAL`)."""
    return [f for f in files if not (folder / f).is_file() and f not in OPTIONAL
            and not (f in EITHER and (folder / EITHER[f]).is_file())]


def cached(repo_id: str, revision: str | None = None, files: Iterable[str] = ()) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` when the loader finds all ``files`` there (see
    :func:`missing`), else None; never touches the network."""
    hub = _hub()
    try:
        folder = Path(hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (hub.errors.LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    return None if missing(folder, files) else folder


def _progress(enabled: bool) -> None:
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if enabled else disable_progress_bars)()


def resolve(spec: str, *, inpaint: bool = False, skip: Iterable[str] = (), progress: bool = True,
            refresh: bool = False) -> Path:
    """The local snapshot folder of the release's Hub id, downloading the planned files (:func:`plan`) that are
    missing. A cached snapshot holding them is used as it is, unless ``refresh`` (``kandinsky download``) asks
    the Hub for the revision's current files. Raises :class:`NotCached` offline, :class:`HubError` otherwise."""
    repo_id, rev = check_spec(spec)
    files = plan(inpaint, skip)
    hub = _hub()
    label = repo_id + (f"@{rev}" if rev else "")
    if not refresh or _offline():
        folder = cached(repo_id, rev, files)
        if folder is not None:
            return folder
        if _offline():
            partial = cached(repo_id, rev)
            what = ("is not in the Hugging Face cache" if partial is None else "in the Hugging Face cache lacks "
                    + ", ".join(missing(partial, files)))
            raise NotCached(f"{label} {what} ({_hf_cache()}) and HF_HUB_OFFLINE=1 forbids downloading it; "
                            f"{_offline_hint()}, or `hf download {repo_id} {' '.join(files)}`, or pass a local "
                            "folder of the release's files")
    try:
        _progress(progress)
        folder = Path(hub.snapshot_download(repo_id, revision=rev, allow_patterns=files))
    except hub.errors.RepositoryNotFoundError:
        raise HubError(f"{repo_id} was not found on the Hub (or needs a token: `hf auth login`), and there is no "
                       f"local folder named {spec!r}") from None
    except hub.errors.RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {rev!r}") from None
    except Exception as exc:  # noqa: BLE001 - network errors come from several libraries
        raise HubError(f"cannot download {label} from the Hugging Face Hub ({type(exc).__name__}: {exc}); with "
                       "the files in the cache, HF_HUB_OFFLINE=1 uses them without the network") from None
    absent = missing(folder, files)
    if absent:
        raise HubError(f"{label} has no {', '.join(absent)}: it is not the original Kandinsky 2.1 file set")
    return folder


# ================================================================================================================
# OpenAI's CLIP ViT-L/14


def cache_dir() -> Path:
    """Where files from outside the Hub are kept: ``$KANDINSKY_CACHE``, else ``$XDG_CACHE_HOME/kandinsky``,
    else ``~/.cache/kandinsky``."""
    if os.environ.get("KANDINSKY_CACHE"):
        return Path(os.environ["KANDINSKY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "kandinsky"


def clip_path() -> Path:
    """Where :func:`openai_clip` keeps ``ViT-L-14.pt`` (named by its SHA-256, as OpenAI's URL is)."""
    return cache_dir() / "openai-clip" / CLIP_SHA256 / CLIP_FILE


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _from_clip_package_cache(target: Path) -> Path | None:
    """The ``clip`` package's copy when its checksum matches, linked into our cache when the file system lets
    (so it is checked once)."""
    for folder in OTHER_CLIP_CACHES:
        path = Path(folder).expanduser() / CLIP_FILE
        if path.is_file() and path.stat().st_size > 0 and sha256_of(path) == CLIP_SHA256:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)
                return target
            except OSError:
                return path
    return None


def openai_clip(*, progress: bool = True) -> Path:
    """``ViT-L-14.pt``: the cached copy (written only whole and checked), else the ``clip`` package's verified
    copy, else downloaded from OpenAI's published URL (resumable, SHA-256 checked). Offline and not cached:
    :class:`NotCached` naming the command and the URL."""
    target = clip_path()
    if target.is_file():
        return target
    found = _from_clip_package_cache(target)
    if found is not None:
        return found
    if _offline():
        raise NotCached(f"OpenAI's CLIP ViT-L/14 (the release's image and prior text encoder, ~0.9 GB) is not in "
                        f"the cache ({target}) and HF_HUB_OFFLINE=1 forbids downloading it; {_offline_hint()}, "
                        f"or download {CLIP_URL} to {target} yourself, or pass clip= the path of a ViT-L-14.pt")
    return download_verified(CLIP_URL, CLIP_SHA256, target, progress=progress, what="OpenAI CLIP ViT-L/14")


def _lock(target: Path) -> Any:
    try:
        from filelock import FileLock
    except ImportError:  # no lock: a concurrent download may then restart the partial file
        import contextlib

        return contextlib.nullcontext()
    return FileLock(str(target) + ".lock")


def download_verified(url: str, sha256: str, target: str | Path, *, progress: bool = True, what: str = "",
                      opener: urllib.request.OpenerDirector | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``target`` only if its SHA-256 is ``sha256``.

    Bytes go to ``target.part`` and become ``target`` by an atomic rename once the checksum matches; a wrong
    checksum deletes them and raises :class:`HubError`, so ``target`` is never a partial or a wrong file. An
    interrupted download keeps the ``.part`` file and the next call resumes it (an HTTP range request; a server
    that answers with the whole file starts it over). ``opener`` replaces urllib's (tests, proxies)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    opener = opener or urllib.request.build_opener()
    label = what or url
    with _lock(target):
        if target.is_file():  # another process finished it meanwhile
            return target
        while True:
            start = part.stat().st_size if part.is_file() else 0
            headers = {"User-Agent": "kandinsky"} | ({"Range": f"bytes={start}-"} if start else {})
            resumed = False
            try:
                with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                    resumed = start > 0 and getattr(resp, "status", None) == 206
                    _receive(resp, part, start if resumed else 0, progress, label)
            except urllib.error.HTTPError as exc:
                if exc.code != 416 or not start:  # 416: the range starts at the end, the part file is whole
                    raise HubError(f"cannot download {label} from {url} (HTTP {exc.code} {exc.reason})") from None
                resumed = True
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                raise HubError(f"cannot download {label} from {url} ({type(exc).__name__}: {exc}); what arrived is "
                               f"kept in {part} and the next try resumes it") from None
            got = sha256_of(part) if part.is_file() else ""
            if got == sha256:
                os.replace(part, target)
                return target
            part.unlink(missing_ok=True)
            if not resumed:
                raise HubError(f"{label} from {url} has SHA-256 {got or '(nothing)'}, not the published {sha256}: "
                               "refused and deleted (a damaged download or a changed file; try again, or check "
                               "the URL)")
            # the resumed bytes did not add up (a stale partial file): start over, once, from the beginning


def _receive(resp: Any, part: Path, start: int, progress: bool, label: str) -> None:
    from tqdm.auto import tqdm

    length = resp.headers.get("Content-Length")
    total = start + int(length) if length and length.isdigit() else None
    with open(part, "ab" if start else "wb") as out, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                                        unit_divisor=1024, desc=label, disable=not progress) as bar:
        while block := resp.read(1 << 20):
            out.write(block)
            bar.update(len(block))


# ================================================================================================================
# the prior's CLIP tokenizer


def _packaged_bpe() -> Path | None:
    from .original_format import OPENAI_BPE_FILE

    for name in BPE_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            path = Path(location) / OPENAI_BPE_FILE
            if path.is_file():
                return path
    return None


def _tokenizer_complete(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() and (
        (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt")
                                                  .is_file()))


def clip_tokenizer(*, progress: bool = True, refresh: bool = False) -> Path:
    """OpenAI's CLIP tokenizer for the prior, which the release does not include: the BPE file of an installed
    ``clip`` / ``open_clip`` package, else ``openai/clip-vit-large-patch14``'s tokenizer files through the
    Hugging Face cache (downloaded when missing and allowed). Offline and not cached: :class:`NotCached`."""
    found = _packaged_bpe()
    if found is not None:
        return found
    how = ("pass clip_tokenizer= a CLIPTokenizer folder or OpenAI's bpe_simple_vocab_16e6.txt.gz, or put either "
           "in the model folder as clip_tokenizer/")
    try:
        hub = _hub()
    except HubError:
        raise NotCached("the prior's CLIP tokenizer is not in the release, no `clip` package is installed, and "
                        f"fetching it from {CLIP_TOKENIZER_REPO} needs huggingface_hub (pip install "
                        f"'kandinsky[hub]'); or {how}") from None
    if not refresh or _offline():
        folder = cached(CLIP_TOKENIZER_REPO)
        if folder is not None and _tokenizer_complete(folder):
            return folder
        if _offline():
            raise NotCached(f"the prior's CLIP tokenizer is not in the release, no `clip` package is installed, "
                            f"and {CLIP_TOKENIZER_REPO}'s tokenizer files are not in the Hugging Face cache "
                            f"({_hf_cache()}) while HF_HUB_OFFLINE=1 forbids downloading them; {_offline_hint()}, "
                            f"or {how}")
    try:
        _progress(progress)
        folder = Path(hub.snapshot_download(CLIP_TOKENIZER_REPO, allow_patterns=list(CLIP_TOKENIZER_FILES)))
    except Exception as exc:  # noqa: BLE001 - network errors come from several libraries
        raise HubError(f"cannot download the CLIP tokenizer from {CLIP_TOKENIZER_REPO} ({type(exc).__name__}: "
                       f"{exc}); {how}") from None
    if not _tokenizer_complete(folder):
        raise HubError(f"{CLIP_TOKENIZER_REPO} has no CLIP tokenizer files; {how}")
    return folder


# ================================================================================================================
# everything at once (`kandinsky download original`)


def download(revision: str | None = None, *, progress: bool = True, refresh: bool = True) -> dict[str, Path]:
    """Fetch (or, offline, find) everything the original release needs for every mode: the repository's files
    with the inpainting UNet, OpenAI's CLIP and the CLIP tokenizer. Returns their local paths."""
    spec = ORIGINAL_REPO + (f"@{revision}" if revision else "")
    return {"original": resolve(spec, inpaint=True, progress=progress, refresh=refresh),
            "clip": openai_clip(progress=progress), "clip_tokenizer": clip_tokenizer(progress=progress)}
