"""kandinsky: a fast, complete implementation of the Kandinsky 2.1 text-to-image system."""

from .pipeline import Embeds, Kandinsky21

__all__ = ["Embeds", "Kandinsky21"]
__version__ = "0.1.0"
