"""Errors of the store: one root, plain-string fields so they pickle across actors."""

from __future__ import annotations

from playbus.actors.engine.errors import PlaybusError

__all__ = ["FencedError", "RedisServerError", "StoreError"]


class StoreError(PlaybusError):
    """Root of the store's errors: a commit or a read failed inside Redis (not a fencing refusal)."""


class FencedError(StoreError):
    """Another owner claimed these key groups since our claim; nothing of ours was written to them."""

    def __init__(self, message: str, groups: str = "") -> None:
        super().__init__(message)
        self.groups = groups  # comma-separated key groups, a plain string so it pickles

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # type: ignore[override]
        return (type(self), (self.message, self.groups))

    @property
    def group_list(self) -> list[int]:
        return [int(g) for g in self.groups.split(",") if g]


class RedisServerError(StoreError):
    """The redis-server binary is missing, or the server did not come up (the message has its log tail)."""
