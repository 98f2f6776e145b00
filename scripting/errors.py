"""Errors of the scripting package: one root, phases split, plain-string fields so they pickle."""

from __future__ import annotations

__all__ = ["ScriptBudgetError", "ScriptCompileError", "ScriptError", "ScriptNotFoundError", "ScriptRuntimeError"]


class ScriptError(Exception):
    """Root of every scripting error."""

    def __init__(self, message: str, name: str = "", version: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.name = name
        self.version = version

    def __reduce__(self) -> tuple[type, tuple[str, str, int]]:
        return (type(self), (self.message, self.name, self.version))

    def __str__(self) -> str:
        return self.message


class ScriptCompileError(ScriptError):
    """The source does not compile, or loading it fails; `line` is 1-based, 0 when unknown."""

    def __init__(self, message: str, name: str = "", version: int = 0, line: int = 0) -> None:
        super().__init__(message, name, version)
        self.line = line

    def __reduce__(self) -> tuple[type, tuple[str, str, int, int]]:  # type: ignore[override]
        return (type(self), (self.message, self.name, self.version, self.line))


class ScriptRuntimeError(ScriptError):
    """A rule run raised an error (its writes and emits were discarded)."""


class ScriptBudgetError(ScriptRuntimeError):
    """A rule run exceeded its instruction budget or memory cap."""


class ScriptNotFoundError(ScriptError):
    """No script, or no such version of it, is registered."""
