"""Outbox: the Redis side of action delivery, per key group (the shards' commits fill it; deliverers drain it).

Keys (a key group's hash tag keeps its keys in one Redis Cluster slot):
    playbus:{kg17}:outbox    stream  field "action" = action JSON (the shards' commits add it); consumer group
                                     "delivery"; an entry stays pending until it is settled
    playbus:{kg17}:attempts  hash    action id -> "<failed attempts>:<first attempt, ms since epoch>"
    playbus:{kg17}:retry     zset    outbox entry id -> when (ms since epoch) to try it again
    playbus:dead             stream  fields action, error, attempts, kg, entry: the actions given up
Settling writes the target stream / dead-letter entry first and XACK+XDEL last, so a crash at any point leaves
the entry pending: redelivered later (XAUTOCLAIM after the claim idle time), never acked without being
delivered. A due retry is leased (re-scored ahead) while it is tried, so a deliverer dying mid-retry only
delays it; `renew` keeps both leases of what a live deliverer holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from playbus.actors.engine.keys import group_prefix
from playbus.actors.store.scripts import lua

__all__ = ["DEAD_STREAM", "GROUP", "Found", "Outbox", "Settlement"]

GROUP = "delivery"
DEAD_STREAM = "playbus:dead"


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _attempts(v: bytes | str | int) -> tuple[int, int]:
    """(failed attempts, first attempt ms) of an attempts-hash value; (n, 0) for a bare count."""
    text = v.decode() if isinstance(v, bytes) else str(v)
    n, _, first = text.partition(":")
    try:
        return int(n or 0), int(first or 0)
    except ValueError:
        return 0, 0


@dataclass(slots=True)
class Found:
    """An outbox entry read for delivery."""

    kg: int
    entry: str
    raw: bytes  # the action JSON as stored
    attempts: int  # failed attempts so far
    first_ms: int = 0  # when the first attempt was made (0: never attempted)
    claimed: bool = False  # taken over from another (or a previous) consumer


@dataclass
class Settlement:
    """What a round of attempts decided, written in one pipeline by `Outbox.settle`."""

    delivered: list[tuple[int, str, str]] = field(default_factory=list)  # (kg, entry, action id)
    to_streams: list[tuple[str, bytes]] = field(default_factory=list)  # (target stream, action JSON)
    dead: list[tuple[int, str, str, bytes, str, int]] = field(default_factory=list)
    # (kg, entry, action id, action JSON, error, attempts)
    later: list[tuple[int, str, str, int, int, int]] = field(default_factory=list)
    # (kg, entry, action id, failed attempts, first attempt ms, due ms)


class Outbox:
    """The outboxes of some key groups, read by one consumer of the "delivery" group."""

    def __init__(self, client: Any, groups: list[int], consumer: str, dead_stream: str = DEAD_STREAM) -> None:
        self.client = client
        self.groups = groups
        self.consumer = consumer
        self.dead_stream = dead_stream
        self._keys = {kg: group_prefix(kg) for kg in groups}
        self._outbox_kg = {group_prefix(kg) + "outbox": kg for kg in groups}
        self._streams = dict.fromkeys(self._outbox_kg, ">")
        self._take_due = client.register_script(lua("outbox_entry", "outbox_due"))
        self._claim = client.register_script(lua("outbox_entry", "outbox_claim"))

    def ensure_groups(self) -> None:
        """Create every outbox stream and its consumer group (idempotent)."""
        pipe = self.client.pipeline(transaction=False)
        for key in self._outbox_kg:
            pipe.xgroup_create(key, GROUP, id="0", mkstream=True)
        for r in pipe.execute(raise_on_error=False):
            if isinstance(r, Exception) and "BUSYGROUP" not in str(r):
                raise r

    def renew(self, held: Iterable[tuple[int, str]], lease_until_ms: int) -> None:
        """Renew the leases of held entries: pending idle time back to 0, retry score pushed to `lease_until_ms`."""
        by_kg: dict[int, list[str]] = {}
        for kg, entry in held:
            by_kg.setdefault(kg, []).append(entry)
        if not by_kg:
            return
        pipe = self.client.pipeline(transaction=False)
        for kg, ids in by_kg.items():
            p = self._keys[kg]
            pipe.xclaim(p + "outbox", GROUP, self.consumer, 0, ids, justid=True)
            pipe.zadd(p + "retry", dict.fromkeys(ids, lease_until_ms), xx=True)
        pipe.execute()

    def scan(self, *, due_ms: int | None, lease_until_ms: int, claim: str | None, claim_idle_ms: int,
             count: int) -> list[Found]:
        """Due retries (when `due_ms` is given: those due by then, leased until `lease_until_ms`) and entries to
        take over (`claim`: "own" for this consumer's pending ones, "idle" for anyone's idle ones), in one
        pipelined round trip over every group."""
        pipe = self.client.pipeline(transaction=False)
        calls: list[tuple[int, bool]] = []
        for kg in self.groups:
            p = self._keys[kg]
            if due_ms is not None:
                self._take_due(keys=[p + "retry", p + "outbox", p + "attempts"],
                               args=[due_ms, lease_until_ms, count], client=pipe)
                calls.append((kg, False))
            if claim is not None:
                self._claim(keys=[p + "outbox", p + "retry", p + "attempts"],
                            args=[GROUP, self.consumer, claim, claim_idle_ms, count], client=pipe)
                calls.append((kg, True))
        if not calls:
            return []
        out: list[Found] = []
        for (kg, claimed), found in zip(calls, pipe.execute(), strict=True):
            for e, raw, n in found:
                failures, first_ms = _attempts(n)
                out.append(Found(kg, _text(e), raw.encode() if isinstance(raw, str) else raw, failures, first_ms,
                                 claimed))
        return out

    def read_new(self, count: int, block_ms: int | None) -> list[Found]:
        """New entries of every outbox (one XREADGROUP); blocks up to `block_ms` when given."""
        try:
            got = self.client.xreadgroup(GROUP, self.consumer, self._streams, count=count, block=block_ms)
        except ResponseError as e:
            if "NOGROUP" not in str(e) and "UNBLOCKED" not in str(e):
                raise
            self.ensure_groups()  # an outbox (or its group) was deleted: recreate, read next time
            return []
        out: list[Found] = []
        resp3 = isinstance(got, dict)  # RESP3: {key: [[entries]]}; RESP2: [[key, [entries]], ...]
        for key, entries in (got.items() if resp3 else got or ()):
            kg = self._outbox_kg[_text(key)]
            for entry, fields in (entries[0] if resp3 and entries else entries):
                raw = (fields or {}).get(b"action") or (fields or {}).get("action") or b""
                out.append(Found(kg, _text(entry), raw.encode() if isinstance(raw, str) else raw, 0))
        return out

    def settle(self, s: Settlement, consumer_note: str = "") -> None:
        """Write a round's outcome in one pipeline: stream deliveries and dead letters first, then retry
        schedules, acks and deletes last (a crash before the acks only redelivers)."""
        pipe = self.client.pipeline(transaction=False)
        for stream, raw in s.to_streams:
            pipe.xadd(stream, {"action": raw})
        done: dict[int, list[tuple[str, str]]] = {}
        for kg, entry, aid in s.delivered:
            done.setdefault(kg, []).append((entry, aid))
        for kg, entry, aid, raw, error, attempts in s.dead:
            pipe.xadd(self.dead_stream, {"action": raw, "error": error, "attempts": attempts, "kg": kg,
                                         "entry": entry, "consumer": consumer_note or self.consumer})
            done.setdefault(kg, []).append((entry, aid))
        for kg, entry, aid, failures, first_ms, due_ms in s.later:
            p = self._keys[kg]
            pipe.hset(p + "attempts", aid, f"{failures}:{first_ms}")
            pipe.zadd(p + "retry", {entry: due_ms})
        for kg, items in done.items():
            p = self._keys[kg]
            ids = [e for e, _ in items]
            pipe.zrem(p + "retry", *ids)
            pipe.hdel(p + "attempts", *{a for _, a in items})
            pipe.xack(p + "outbox", GROUP, *ids)
            pipe.xdel(p + "outbox", *ids)
        if len(pipe):
            pipe.execute()
