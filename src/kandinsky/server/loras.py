"""The LoRA adapters a server offers: the entries of its ``--lora-dir``, chosen by name in requests.

A request names adapters (``{"name": ..., "scale": ...}``, or A1111's ``<lora:NAME:SCALE>`` in the prompt); a
name is looked up among the folder's entries, so no path from a request ever reaches the file system.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..metadata import lora_tag_pattern
from ..weights import lora as lora_files
from .images import FieldError


class LoraLibrary:
    """Adapters in ``folder``: ``NAME/adapter_model.safetensors`` (peft's layout), ``NAME/pytorch_lora_weights
    .safetensors`` (diffusers') or ``NAME.safetensors``. The folder is read at each lookup, so adapters dropped in
    while the server runs are offered at once."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder else None

    def entries(self) -> dict[str, Path]:
        """Name -> adapter path, sorted by name."""
        if self.folder is None or not self.folder.is_dir():
            return {}
        out: dict[str, Path] = {}
        for entry in sorted(self.folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and lora_files.adapter_file(entry).is_file():
                out[entry.name] = entry
            elif entry.is_file() and entry.suffix == ".safetensors":
                out[entry.stem] = entry
        return out

    def names(self) -> list[str]:
        return list(self.entries())

    def resolve(self, refs: Iterable[tuple[str, float]], field: str = "loras") -> list[tuple[str, float]]:
        """(name, scale) pairs -> (path, scale) pairs; an unknown name is a :class:`FieldError` naming it."""
        refs = list(refs)
        if not refs:
            return []
        entries = self.entries()
        out = []
        for i, (name, scale) in enumerate(refs):
            if name not in entries:
                hint = (f"this server offers {', '.join(entries)}" if entries else
                        "this server offers none (start it with --lora-dir DIR)")
                raise FieldError(f"{field}[{i}].name" if field == "loras" else field,
                                 f"unknown LoRA adapter {name[:100]!r}; {hint}")
            out.append((str(entries[name]), float(scale)))
        return out


def split_prompt_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's ``<lora:NAME:SCALE>`` tags taken out of a prompt: (the prompt without them, [(name, scale)])."""
    pattern = lora_tag_pattern()
    tags: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        try:
            tags.append((match.group(1), float(match.group(2))))
        except ValueError:
            return match.group(0)
        return ""

    return pattern.sub(take, prompt).strip(), tags


def describe(library: LoraLibrary) -> list[dict[str, Any]]:
    """The adapters for ``GET /v1/models``: name and, where the file says, trigger words and base model."""
    out = []
    for name, path in library.entries().items():
        item: dict[str, Any] = {"name": name}
        try:
            meta = lora_files.read_meta(path)
            for key in ("trigger_words", "base_model", "rank"):
                if meta.get(key):
                    item[key] = meta[key]
        except Exception:  # noqa: BLE001 - a damaged file is listed as such, not a failed listing
            item["error"] = "unreadable"
        out.append(item)
    return out
