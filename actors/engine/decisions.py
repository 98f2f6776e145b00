"""Decision: one rule run as the journal keeps it, a tuple that is cheap to build and to pack, read by name."""

from __future__ import annotations

from typing import Any

__all__ = ["DECISION_FIELDS", "Decision"]

DECISION_FIELDS = ("campaign", "user", "event", "ts", "rule", "script_version", "actions", "changes", "error",
                   "refused")
_INDEX = {f: i for i, f in enumerate(DECISION_FIELDS)}
_get = tuple.__getitem__


class Decision(tuple):  # type: ignore[type-arg]
    """Fields in DECISION_FIELDS order; `d["rule"]` reads by name; msgpack packs it as an array."""

    __slots__ = ()

    def __getitem__(self, key: Any) -> Any:
        if type(key) is str:
            return _get(self, _INDEX[key])
        return _get(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        i = _INDEX.get(key)
        return default if i is None else _get(self, i)

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(DECISION_FIELDS, self, strict=True))

    @staticmethod
    def from_packed(value: Any) -> dict[str, Any]:
        """A journal entry read back from Redis (an array, or a map from older commits) as a dict."""
        if isinstance(value, dict):
            return value
        return dict(zip(DECISION_FIELDS, value, strict=False))
