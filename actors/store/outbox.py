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

On a Redis Cluster the commits also put here what belongs to other slots (store/commit.py): entries of field
"send" (msgpack [target group, record batch]) and "rejected" (a `playbus:rejected` record), and the actions of
stream targets. `forward` writes such entries where they belong, in outbox order, and acks them. There a
pipeline's commands to different nodes run in no set order, so writes and acks are two round trips: the acks only
once every write answered (on one server, one pipeline runs in order). Reads of many outboxes are one command per
outbox (XREADGROUP over several slots is refused), pipelined, and never block.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from playbus.actors.engine.keys import group_prefix
from playbus.actors.store.commit import REJECTED_STREAM
from playbus.actors.store.connect import is_cluster_client
from playbus.actors.store.scripts import lua
from playbus.actors.store.slots import Cmd, evalsha, execute

__all__ = ["DEAD_STREAM", "FORWARDED", "GROUP", "Found", "Outbox", "Settlement"]

GROUP = "delivery"
DEAD_STREAM = "playbus:dead"
FORWARDED = ("send", "rejected")  # outbox entry kinds that are forwarded, never attempted (see the module doc)
PENDING_PAGE = 1000  # pending entries read per XREADGROUP when recovering forwards
_unpack = msgspec.msgpack.Decoder().decode


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
    kind: str = "action"  # the entry's field: "action", or "send" / "rejected" (forwarded; see the module doc)


def _kind_of(fields: Any) -> tuple[str, bytes]:
    """(kind, payload) of an outbox entry's fields (a dict of bytes or str keys)."""
    for kind in ("action", "send", "rejected"):
        v = fields.get(kind.encode())
        if v is None:
            v = fields.get(kind)
        if v is not None:
            return kind, v.encode() if isinstance(v, str) else v
    return "action", b""


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
        self.cluster = is_cluster_client(client)

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
        calls: list[tuple[int, bool, Any, list[str], list[Any]]] = []  # (group, claimed, script, keys, args)
        for kg in self.groups:
            p = self._keys[kg]
            if due_ms is not None:
                calls.append((kg, False, self._take_due, [p + "retry", p + "outbox", p + "attempts"],
                              [due_ms, lease_until_ms, count]))
            if claim is not None:
                calls.append((kg, True, self._claim, [p + "outbox", p + "retry", p + "attempts"],
                              [GROUP, self.consumer, claim, claim_idle_ms, count]))
        if not calls:
            return []
        if self.cluster:
            sources = [lua("outbox_entry", "outbox_due"), lua("outbox_entry", "outbox_claim")]
            answers = _raise_first(execute(self.client, [evalsha(c[2].sha, c[3], c[4]) for c in calls], sources))
        else:
            pipe = self.client.pipeline(transaction=False)
            for _, _, script, keys, args in calls:
                script(keys=keys, args=args, client=pipe)
            answers = pipe.execute()
        out: list[Found] = []
        for (kg, claimed, *_), found in zip(calls, answers, strict=True):
            for e, raw, n, kind in found:
                failures, first_ms = _attempts(n)
                out.append(Found(kg, _text(e), raw.encode() if isinstance(raw, str) else raw, failures, first_ms,
                                 claimed, _text(kind)))
        return out

    def read_new(self, count: int, block_ms: int | None) -> list[Found]:
        """New entries of every outbox (one XREADGROUP); blocks up to `block_ms` when given. On a Redis Cluster one
        XREADGROUP per outbox, pipelined; when none has anything, it sleeps `block_ms` instead of blocking."""
        if self.cluster:
            return self._read_cluster(count, block_ms)
        try:
            got = self.client.xreadgroup(GROUP, self.consumer, self._streams, count=count, block=block_ms)
        except ResponseError as e:
            if "NOGROUP" not in str(e) and "UNBLOCKED" not in str(e):
                raise
            self.ensure_groups()  # an outbox (or its group) was deleted: recreate, read next time
            return []
        return self._found(got)

    def _found(self, got: Any) -> list[Found]:
        out: list[Found] = []
        resp3 = isinstance(got, dict)  # RESP3: {key: [[entries]]}; RESP2: [[key, [entries]], ...]
        for key, entries in (got.items() if resp3 else got or ()):
            kg = self._outbox_kg[_text(key)]
            for entry, fields in (entries[0] if resp3 and entries else entries):
                kind, raw = _kind_of(fields or {})
                out.append(Found(kg, _text(entry), raw, 0, kind=kind))
        return out

    def _read_cluster(self, count: int, block_ms: int | None, starts: dict[int, str] | None = None) -> list[Found]:
        """One XREADGROUP per outbox (from `starts`: group -> id, default ">" for every group), pipelined; sleeps
        `block_ms` when nothing was read."""
        starts = starts if starts is not None else dict.fromkeys(self.groups, ">")
        cmds = []
        for kg, start in starts.items():
            key = self._keys[kg] + "outbox"
            cmds.append(Cmd(("XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", count, "STREAMS", key, start), key))
        out: list[Found] = []
        recreate = False
        for got in execute(self.client, cmds):
            if isinstance(got, ResponseError) and "NOGROUP" in str(got):
                recreate = True  # an outbox (or its group) was deleted: recreate, read next time
            elif isinstance(got, Exception):
                raise got
            else:
                out += self._found(got)
        if recreate:
            self.ensure_groups()
        if not out and block_ms:
            time.sleep(block_ms / 1000)
        return out

    def pending_forwards(self) -> list[Found]:
        """Every entry to forward ("send", "rejected") that this consumer holds pending (read, not acked), oldest
        first per group: after a failed `forward` or a restart they are forwarded again before anything newer, so
        that forwarding keeps each outbox's order. Pending actions are left to `scan` (claim "own")."""
        out: list[Found] = []
        last = dict.fromkeys(self.groups, "0")  # XREADGROUP from an id gives this consumer's pending entries after it
        while last:
            if self.cluster:
                page = self._read_cluster(PENDING_PAGE, None, last)
            else:
                streams = {self._keys[kg] + "outbox": e for kg, e in last.items()}
                page = self._found(self.client.xreadgroup(GROUP, self.consumer, streams, count=PENDING_PAGE))
            counts: dict[int, int] = {}
            for f in page:
                counts[f.kg] = counts.get(f.kg, 0) + 1
                last[f.kg] = f.entry
                if f.kind in FORWARDED:
                    out.append(f)
            last = {kg: e for kg, e in last.items() if counts.get(kg, 0) >= PENDING_PAGE}
        return out

    def forward(self, entries: Iterable[Found], streams: dict[str, str] | None = None) -> int:
        """Write entries where they belong and ack them: "send" to the target group's input partition (field
        "events"), "rejected" to `playbus:rejected`, an action to the stream `streams[gameplay]` names. The writes
        keep the given order (per target, the outboxes' order); each entry is acked only once every write
        answered. Returns the entries forwarded. An entry it cannot read is dead-lettered (it could never be
        forwarded)."""
        writes: list[tuple[str, dict[str, Any]]] = []
        done: dict[int, list[str]] = {}
        dead: list[tuple[str, dict[str, Any]]] = []
        for f in entries:
            try:
                stream, fields = self._destination(f, streams or {})
            except (ValueError, TypeError, KeyError, msgspec.DecodeError) as e:
                dead.append((self.dead_stream, {"action": f.raw, "error": f"cannot forward a {f.kind!r} outbox entry: "
                                                f"{type(e).__name__}: {e}"[:300], "attempts": 0, "kg": -1,
                                                "entry": f.entry, "consumer": self.consumer}))
            else:
                writes.append((stream, fields))
            done.setdefault(f.kg, []).append(f.entry)
        if not done:
            return 0
        writes += dead
        pipe = self.client.pipeline(transaction=False)
        for stream, fields in writes:
            pipe.xadd(stream, fields)
        if writes:  # the acks only once every write is in, even on one server (a write refused: nothing acked)
            _raise_first(pipe.execute(raise_on_error=False))
            pipe = self.client.pipeline(transaction=False)
        for kg, ids in done.items():
            p = self._keys[kg]
            pipe.xack(p + "outbox", GROUP, *ids)
            pipe.xdel(p + "outbox", *ids)
        pipe.execute()
        return sum(len(ids) for ids in done.values())

    @staticmethod
    def _destination(f: Found, streams: dict[str, str]) -> tuple[str, dict[str, Any]]:
        """(stream, fields) an entry to forward is written to."""
        if f.kind == "send":
            target, batch = _unpack(f.raw)
            return group_prefix(int(target)) + "in", {"events": bytes(batch)}
        if f.kind == "rejected":
            return REJECTED_STREAM, {"rejected": f.raw}
        gameplay = str(msgspec.json.decode(f.raw)["type"]).split(".", 1)[0]
        return streams[gameplay], {"action": f.raw}

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
        if self.cluster and (s.to_streams or s.dead) and done:  # the acks only once the writes are in
            _raise_first(pipe.execute(raise_on_error=False))
            pipe = self.client.pipeline(transaction=False)
        for kg, items in done.items():
            p = self._keys[kg]
            ids = [e for e, _ in items]
            pipe.zrem(p + "retry", *ids)
            pipe.hdel(p + "attempts", *{a for _, a in items})
            pipe.xack(p + "outbox", GROUP, *ids)
            pipe.xdel(p + "outbox", *ids)
        if len(pipe):
            pipe.execute()


def _raise_first(answers: list[Any]) -> list[Any]:
    """The answers of a pipeline run with raise_on_error=False, or its first error raised."""
    for a in answers:
        if isinstance(a, Exception):
            raise a
    return answers
