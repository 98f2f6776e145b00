"""Errors of the actors package: one root, plain-string fields so they pickle across Ray."""

from __future__ import annotations

__all__ = ["EngineError", "StateError"]


class EngineError(Exception):
    """Root of the errors raised by the shard engine and the actors around it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class StateError(EngineError):
    """A snapshot cannot be decoded or belongs to a newer format."""
