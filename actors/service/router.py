"""Routing of events to shards: by the key group of (campaign, user), the same on every ingress."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from playbus.actors.engine.events import EventIn, Rejected, check_event
from playbus.actors.engine.keys import key_group, shard_of_group, user_key

ShardCall = Callable[[int, str, Sequence[Any]], Awaitable[Any]]

__all__ = ["Router"]

_encode = msgspec.msgpack.Encoder().encode  # events (EventIn or dicts) to the shards
_decode = msgspec.msgpack.Decoder().decode  # their results


class Router:
    """Splits a request's events into per-shard lists, remembering each event's place in the request."""

    def __init__(self, shards: int, key_groups: int) -> None:
        self.shards = shards
        self.key_groups = key_groups
        self._shard_of = [shard_of_group(kg, shards, key_groups) for kg in range(key_groups)]

    def shard_of(self, campaign: str, user: str) -> int:
        return self._shard_of[key_group(user_key(campaign, user), self.key_groups)]

    def split(self, events: list[Any]) -> dict[int, tuple[list[int], list[Any]]]:
        """{shard: (positions, events)}. Events without string campaign/user go to shard 0, which rejects them."""
        out: dict[int, tuple[list[int], list[Any]]] = {}
        shard_of, n = self._shard_of, self.key_groups
        for i, e in enumerate(events):
            s = 0
            if type(e) is EventIn:
                s = shard_of[key_group(f"{e.campaign}\x00{e.user}", n)]  # = keys.user_key, inlined per event
            elif type(e) is dict:
                c, u = e.get("campaign"), e.get("user")
                if type(c) is str and type(u) is str:
                    s = shard_of[key_group(f"{c}\x00{u}", n)]  # = keys.user_key, inlined per event
            slot = out.get(s)
            if slot is None:
                out[s] = ([i], [e])
            else:
                slot[0].append(i)
                slot[1].append(e)
        return out

    async def dispatch(self, events: list[Any], call_shard: ShardCall) -> list[dict[str, Any]]:
        """Send each shard its events (one call per shard, concurrently); results in input order. Events
        rejected while decoding are answered here; an event msgpack cannot carry (an integer beyond 64 bits)
        is rejected here, alone."""
        results: list[dict[str, Any]] = [None] * len(events)  # type: ignore[list-item]
        index: list[int] = []
        for i, e in enumerate(events):
            if type(e) is Rejected:
                results[i] = {"id": e.id, "status": "rejected", "actions": [], "errors": [e.reason]}
            else:
                index.append(i)
        todo = [events[i] for i in index] if len(index) < len(events) else events
        try:
            parts = self.split(todo)
            payloads = [_encode(evs) for _, evs in parts.values()]
        except (OverflowError, ValueError, TypeError):
            index = [i for i in index if not _unencodable(events[i], i, results)]
            parts = self.split([events[i] for i in index])
            payloads = [_encode(evs) for _, evs in parts.values()]
        replies = await asyncio.gather(*(call_shard(s, "process", (p,)) for s, p in zip(parts, payloads, strict=True)))
        for (pos, _), reply in zip(parts.values(), replies, strict=True):
            for i, r in zip(pos, _decode(reply), strict=True):
                results[index[i]] = r
        return results


def _unencodable(event: Any, i: int, results: list[dict[str, Any]]) -> bool:
    """True (and a `rejected` result at i) when `event` cannot be encoded for the shards."""
    try:
        _encode(event)
        return False
    except (OverflowError, ValueError, TypeError) as e:
        rid = event.get("id") if type(event) is dict else None
        reason = check_event(event, 0)[1] or f"event cannot be encoded ({e}): integers must fit in 64 bits"
        results[i] = {"id": rid if type(rid) is str else None, "status": "rejected", "actions": [],
                      "errors": [reason]}
        return True
