"""Errors of the engine, and the base every layer's error root shares: a plain message, so it pickles across Ray."""

from __future__ import annotations

__all__ = ["EngineError", "PlaybusError", "StateError"]


class PlaybusError(Exception):
    """Base of the error roots of the actors' layers (EngineError, StoreError, ServiceError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class EngineError(PlaybusError):
    """Root of the errors raised by the decision engine."""


class StateError(EngineError):
    """A snapshot cannot be decoded or belongs to a newer format."""
