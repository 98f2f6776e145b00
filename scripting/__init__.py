"""Sandboxed Lua decision scripts: the sandbox, the script registry and hot reload."""

from __future__ import annotations

if not __name__.startswith("playbus."):
    raise ImportError(f"import playbus.{__name__}, not {__name__}: this folder is a subpackage of playbus")

from playbus.scripting.errors import (
    ScriptBudgetError,
    ScriptCompileError,
    ScriptError,
    ScriptNotFoundError,
    ScriptRuntimeError,
)
from playbus.scripting.sandbox import BUDGET_ERROR, MEMORY_ERROR, STRIDE, TIME_ERROR, Sandbox

__all__ = [
    "BUDGET_ERROR",
    "MEMORY_ERROR",
    "STRIDE",
    "TIME_ERROR",
    "Sandbox",
    "ScriptBudgetError",
    "ScriptCompileError",
    "ScriptError",
    "ScriptNotFoundError",
    "ScriptRuntimeError",
]
