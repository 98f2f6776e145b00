"""Decision: one rule run as the journal keeps it, a tuple that is cheap to build and to pack, read by name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["DECISION_FIELDS", "Decision", "actions_of", "repeat_actions"]

DECISION_FIELDS = ("campaign", "user", "event", "ts", "rule", "script_version", "actions", "changes", "error",
                   "refused", "effects")
# `effects`: what the run did besides actions: {"send": user, "type", "id"} (an event for another user),
# {"later": timer name, "type", "id", "due"} (a timer set or replaced), {"cancel": key, "id"} (a pending timer
# removed); and {"fired": timer name} when the run's event is a timer that fired.
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
        d = value if isinstance(value, dict) else dict(zip(DECISION_FIELDS, value, strict=False))
        if "effects" not in d:  # written before rules could send
            d["effects"] = []
        return d


def actions_of(entries: Iterable[Any], event_id: str) -> list[dict[str, Any]]:
    """The actions an event's first processing granted, from a user's journal entries (dicts or Decisions,
    oldest first): every rule run of that event, in rule order."""
    out: list[dict[str, Any]] = []
    for e in entries:
        if e["event"] == event_id:
            out.extend(e["actions"])
    return out


def repeat_actions(results: list[dict[str, Any]], earlier: Iterable[tuple[int, str, str]],
                   journals: Mapping[str, Iterable[Any]]) -> None:
    """Give each duplicate of an earlier batch (index, user key, event id) the actions of its first processing,
    from the users' journals (user key -> entries oldest first); [] when the journal no longer holds it."""
    for idx, key, eid in earlier:
        results[idx]["actions"] = actions_of(journals.get(key, ()), eid)
