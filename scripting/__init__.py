"""Sandboxed Lua decision scripts: the sandbox, the script registry and hot reload."""

from __future__ import annotations

from scripting.errors import (
    ScriptBudgetError,
    ScriptCompileError,
    ScriptError,
    ScriptNotFoundError,
    ScriptRuntimeError,
)
from scripting.sandbox import BUDGET_ERROR, MEMORY_ERROR, STRIDE, TIME_ERROR, Sandbox

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
