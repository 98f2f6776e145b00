"""Errors of the config package: one root, plain-string fields so they pickle across actors."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """A configuration file cannot be used; the message names the file, the field and what was expected."""

    def __init__(self, message: str, file: str = "", path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.path = path

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.message, self.file, self.path))

    def __str__(self) -> str:
        return self.message
