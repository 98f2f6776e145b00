"""Routing of events to shards: by the key group of (campaign, user), the same on every ingress."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from playbus.actors.engine.events import EventIn, Rejected, check_event
from playbus.actors.engine.keys import contiguous_owners, key_group, user_key
from playbus.actors.service.errors import NotOwner

ShardCall = Callable[[int, str, Sequence[Any]], Awaitable[Any]]

__all__ = ["Router"]

_encode = msgspec.msgpack.Encoder().encode  # events (EventIn or dicts) to the shards
_decode = msgspec.msgpack.Decoder().decode  # their results


class _Unencodable(Exception):
    """Some event cannot be encoded for the shards (nothing was sent)."""


def _not_owner(e: BaseException) -> bool:
    """A shard's NotOwner, as raised here or wrapped by Ray."""
    return isinstance(e, NotOwner) or isinstance(getattr(e, "cause", None), NotOwner)


class Router:
    """Splits a request's events into per-shard lists, remembering each event's place in the request, and sends
    each list to the owner of its key groups as the shard map says; a shard that no longer owns them (a rescale
    moved them) answers NotOwner, and those events go again, to the owner of a fresh reading of the map."""

    def __init__(self, shards: int, key_groups: int, refresh: Callable[[], Awaitable[None]] | None = None,
                 retry_s: float = 30.0) -> None:
        """`refresh()`: read the shard map again (and call `set_owners`); `retry_s`: how long events refused by
        shards are sent again before the call fails (a rescale moves a group in well under a second)."""
        self.shards = shards  # every shard index a caller may reach (broadcasts go to range(shards))
        self.key_groups = key_groups
        self._shard_of = contiguous_owners(shards, key_groups)
        self.refresh = refresh
        self.retry_s = retry_s
        self.rerouted = 0  # events sent again after a NotOwner

    def set_owners(self, owners: list[int], shards: int) -> None:
        """The shard map's owner of each key group, and the number of shards to broadcast to."""
        if len(owners) != self.key_groups:
            raise ValueError(f"{len(owners)} owners for {self.key_groups} key groups")
        self._shard_of = list(owners)
        self.shards = max(shards, max(owners) + 1)

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
            elif type(e) is not Rejected:  # a Replay, or another event structure
                c, u = getattr(e, "campaign", None), getattr(e, "user", None)
                if type(c) is str and type(u) is str:
                    s = shard_of[key_group(f"{c}\x00{u}", n)]  # = keys.user_key
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
            got = await self.route(todo, call_shard)
        except _Unencodable:
            index = [i for i in index if not _unencodable(events[i], i, results)]
            got = await self.route([events[i] for i in index], call_shard)
        for i, r in zip(index, got, strict=True):
            results[i] = r
        return results

    async def route(self, events: list[Any], call_shard: ShardCall, method: str = "process",
                    encoded: bool = True) -> list[Any]:
        """Each shard's events in one call (concurrently), results in input order. `encoded`: the events go as
        one msgpack payload and the results come back as one (else as Python objects). Events a shard refuses
        with NotOwner go again after the map is read again, for up to `retry_s`."""
        results: list[Any] = [None] * len(events)
        todo = list(range(len(events)))
        loop = asyncio.get_running_loop()
        end = loop.time() + self.retry_s
        delay = 0.01
        while True:
            parts = self.split([events[i] for i in todo] if len(todo) < len(events) else events)
            try:
                payloads = [_encode(evs) if encoded else evs for _, evs in parts.values()]
            except (OverflowError, ValueError, TypeError) as e:
                raise _Unencodable(str(e)) from e  # before anything was sent
            replies = await asyncio.gather(*(call_shard(s, method, (p,)) for s, p in zip(parts, payloads, strict=True)),
                                           return_exceptions=True)
            again: list[int] = []
            refused: BaseException | None = None
            for (pos, _), reply in zip(parts.values(), replies, strict=True):
                if isinstance(reply, BaseException):
                    if not _not_owner(reply):
                        raise reply
                    refused = reply
                    again += [todo[p] for p in pos]
                    continue
                for p, r in zip(pos, _decode(reply) if encoded else reply, strict=True):
                    results[todo[p]] = r
            if not again:
                return results
            if loop.time() + delay > end:
                assert refused is not None
                raise refused
            self.rerouted += len(again)
            if self.refresh is not None:
                await self.refresh()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            todo = sorted(again)


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
