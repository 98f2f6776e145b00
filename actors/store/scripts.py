"""The store's Lua scripts, read from the .lua files shipped beside this module (package data)."""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["lua"]


@cache
def lua(*names: str) -> str:
    """The source of these .lua files of playbus.actors.store, joined in order (a helper file first)."""
    files = resources.files("playbus.actors.store")
    return "\n".join(files.joinpath(f"{n}.lua").read_text(encoding="utf-8") for n in names)
