"""kandinsky: a fast, complete implementation of the Kandinsky 2.1 text-to-image system."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Embeds", "Kandinsky21"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .pipeline import Embeds, Kandinsky21


def __getattr__(name: str) -> Any:
    """Import the pipeline (and with it torch and transformers) only when it is first used."""
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'kandinsky' has no attribute {name!r}")
