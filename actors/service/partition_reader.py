"""PartitionReader: a shard reads the input partitions of its key groups itself (a partitioned log consumed by its
owner, as in Kafka), and feeds what it reads to its micro-batcher.

    playbus:{kgN}:in      the group's input partition (XADD by producers: field "events" = msgpack array of
                          events, a record batch; or "event" = one event, JSON or msgpack)
    playbus:{kgN}:offset  the last entry a committed batch consumed, written inside that batch's commit unit

Each group has at most one chunk in flight: read from the group's cursor (the committed offset at start), submit
the chunk with its last entry id as the offset to commit; on success the cursor moves past it, on failure it stays
and the chunk is read again. So a user's events are decided in the order they were added, and a crash at any
point re-reads exactly what was not committed (consume, decide and commit are one atomic step). Invalid events
are committed to `playbus:rejected` with the batch that consumes them. A chunk whose processing keeps failing for
a reason other than an outage is read again one entry at a time, and an entry that still fails POISON_AFTER
times alone is rejected, so that the entries behind it go on.

On a Redis Cluster one XREAD over the partitions of several groups is refused (their slots differ): each poll is
one non-blocking XREAD per idle group, pipelined (a round trip per node), and a poll that finds nothing waits
`block_ms`, doubling up to IDLE_MAX_MS while the partitions stay empty.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from redis.exceptions import RedisClusterException, RedisError

from playbus.actors.engine.errors import PlaybusError
from playbus.actors.engine.events import (
    EventIn,
    Rejected,
    decode_events,
    decode_json_events,
    is_msgpack_array,
    is_msgpack_map,
)
from playbus.actors.engine.keys import group_prefix, key_group, user_key
from playbus.actors.store.connect import connect_async, is_cluster
from playbus.actors.store.slots import Cmd, aexecute

__all__ = ["MAX_EVENT", "POISON_AFTER", "PartitionReader", "decode_entry", "is_transient", "rejection",
           "rejection_of"]

log = logging.getLogger("playbus.partitions")
POISON_AFTER = 3
MAX_REJECTION = 262_144  # bytes of one playbus:rejected record
MAX_EVENT = 64 * 1024  # one event in an entry's field "event"
MAX_ENTRY = 20 * 1024 * 1024  # one entry: up to a record batch of 1000 events of 16 KiB data
IDLE_MAX_MS = 50  # on a Redis Cluster, the longest wait between two polls that found nothing
Submit = Callable[[list[Any], tuple[int, str], list[bytes]], Awaitable[list[dict[str, Any]]]]


def is_transient(error: BaseException) -> bool:
    """An outage (Redis, a shard restarting, a timeout, a batch to retry) rather than something about the input."""
    return isinstance(error, (OSError, TimeoutError, asyncio.TimeoutError, RedisError, RedisClusterException,
                              PlaybusError))


def rejection(entry: str, partition: int | None, event: Any, reason: str) -> bytes:
    """A `playbus:rejected` record (field "rejected"): the entry, its partition, the event (as far as it could be
    read) and why."""
    if isinstance(event, bytes):
        event = event[:65536].decode("utf-8", "replace")
    doc = {"entry": entry, "partition": partition, "event": event, "reason": reason[:4096]}
    out = json.dumps(doc, default=str, ensure_ascii=False).encode()
    if len(out) > MAX_REJECTION:  # keep the record valid JSON: cut the event, as text
        text = event if isinstance(event, str) else json.dumps(event, default=str, ensure_ascii=False)
        doc["event"] = text[:MAX_REJECTION // 8] + "..."
        doc["event_truncated"] = True
        out = json.dumps(doc, default=str, ensure_ascii=False).encode()
    return out


def rejection_of(entry: str, partition: int | None, ev: Rejected) -> bytes:
    """The `playbus:rejected` record of an event that was rejected while decoding."""
    return rejection(entry, partition, ev.raw if ev.raw is not None else {"id": ev.id}, ev.reason)


def as_dict(ev: EventIn) -> dict[str, Any]:
    """An event as plain data (its data decoded), for a rejection record."""
    doc: dict[str, Any] = {"id": ev.id, "campaign": ev.campaign, "user": ev.user, "type": ev.type, "ts": ev.ts}
    if len(ev.data) > 1:
        doc["data"] = msgspec.msgpack.decode(ev.data)
    return doc


def decode_entry(fields: dict[bytes, bytes]) -> tuple[list[EventIn | Rejected], str]:
    """(events, "") of an input entry (a record batch or one event), each valid or rejected; or ([], reason)
    when the entry itself cannot be read."""
    raw = fields.get(b"events")
    if raw is not None:
        if len(raw) > MAX_ENTRY:
            return [], f"record batch of {len(raw)} bytes is too large"
        if not is_msgpack_array(raw):
            return [], "field 'events' is not a msgpack array of events"
        try:
            return decode_events(raw), ""
        except Exception as e:  # noqa: BLE001 - any decoding failure rejects the entry
            return [], f"field 'events' is not a msgpack array of events: {e}"
    raw = fields.get(b"event")
    if raw is None:
        return [], 'entry has neither field "events" nor "event"'
    if len(raw) > MAX_EVENT:
        return [], f"event of {len(raw)} bytes is too large"
    try:
        if raw.lstrip()[:1] == b"{":
            return decode_json_events(raw), ""
        if is_msgpack_map(raw):
            return decode_events(raw), ""
    except Exception as e:  # noqa: BLE001 - any decoding failure rejects the entry
        return [], f"event is neither JSON nor msgpack: {e}"
    return [], "event is neither JSON nor msgpack: expected one event (an object)"


class PartitionReader:
    """Reads the input partitions of `groups` and submits chunks to `submit(events, (group, offset), rejected)`."""

    def __init__(self, redis_url: str, groups: list[int], submit: Submit, campaigns: set[str], chunk: int = 500,
                 block_ms: int = 10, key_groups: int | None = None) -> None:
        self.client = connect_async(redis_url, socket_timeout=30)
        self.cluster = is_cluster(redis_url)
        self._idle_ms = block_ms
        self.key_groups = key_groups  # when given, an event in another group's partition is rejected
        self.groups = sorted(groups)
        self.submit = submit
        self.campaigns = campaigns
        self.chunk = chunk
        self.block_ms = block_ms
        self.cursors: dict[int, str] = {}
        self.keys = {kg: group_prefix(kg) + "in" for kg in self.groups}
        self._kg_of = {k.encode(): kg for kg, k in self.keys.items()}
        self.failures: dict[tuple[int, str], int] = {}  # (group, first entry of a chunk) -> non-transient failures
        self.single: set[int] = set()  # groups read one entry at a time, to find a poison entry
        self.stats = {"events": 0, "chunks": 0, "rejected": 0, "poison": 0, "failed_chunks": 0}
        self.running = False
        self.last_error = ""

    async def load_cursors(self) -> None:
        keys = [group_prefix(kg) + "offset" for kg in self.groups]
        if self.cluster:  # MGET over several slots is refused
            values: Any = await aexecute(self.client, [Cmd(("GET", k)) for k in keys])
            for v in values:
                if isinstance(v, Exception):
                    raise v
        else:
            values = await self.client.mget(keys)
        self.cursors = {kg: (v.decode() if v else "0-0") for kg, v in zip(self.groups, values, strict=True)}

    async def run(self, stop: asyncio.Event) -> None:
        """Read and submit until `stop`; then wait for the chunks in flight."""
        self.running = True
        inflight: dict[int, asyncio.Task[None]] = {}
        try:
            while not stop.is_set():
                if not self.cursors:
                    try:
                        await self.load_cursors()
                    except (OSError, RedisError, RedisClusterException) as e:
                        self.last_error = f"{type(e).__name__}: {e}"
                        await asyncio.sleep(0.5)
                        continue
                idle = [kg for kg in self.groups if kg not in inflight]
                if not idle:
                    await asyncio.wait(list(inflight.values()), return_when=asyncio.FIRST_COMPLETED)
                    continue
                streams: Any = {self.keys[kg]: self.cursors[kg] for kg in idle}
                try:
                    if self.cluster:
                        got: Any = await self._read_cluster(streams)
                        if got:
                            self._idle_ms = self.block_ms
                        else:
                            await self._wait_idle(inflight)
                    else:
                        got = await self.client.xread(streams, count=self.chunk, block=self.block_ms)
                except (OSError, RedisError, RedisClusterException) as e:
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.warning("partition reader: redis unavailable (%s); retrying", e)
                    await asyncio.sleep(0.5)
                    continue
                for key, entries in (got.items() if isinstance(got, dict) else got or ()):
                    kg = self._kg_of[key if isinstance(key, bytes) else key.encode()]
                    if isinstance(got, dict):
                        entries = entries[0] if entries and isinstance(entries[0], list) else entries
                    if kg in self.single:
                        entries = entries[:1]
                    task = asyncio.get_running_loop().create_task(self._chunk(kg, entries))
                    inflight[kg] = task
                    task.add_done_callback(self._done_callback(inflight, kg))
        finally:
            if inflight:
                await asyncio.gather(*inflight.values(), return_exceptions=True)
            self.running = False

    async def _read_cluster(self, streams: dict[str, str]) -> list[Any]:
        """One XREAD per partition, pipelined and not blocking: [[key, entries], ...] of those with entries."""
        cmds = [Cmd(("XREAD", "COUNT", self.chunk, "STREAMS", key, cursor), key) for key, cursor in streams.items()]
        got: list[Any] = []
        for r in await aexecute(self.client, cmds):
            if isinstance(r, Exception):
                raise r
            if r:
                got += r.items() if isinstance(r, dict) else r
        return got

    async def _wait_idle(self, inflight: dict[int, asyncio.Task[None]]) -> None:
        """After a cluster poll that found nothing: wait `block_ms`, doubling while nothing comes, or until a chunk
        in flight is done (its group may have more)."""
        delay = self._idle_ms / 1000
        self._idle_ms = min(max(1, self._idle_ms) * 2, IDLE_MAX_MS)
        if inflight:
            await asyncio.wait(list(inflight.values()), timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(delay)

    @staticmethod
    def _done_callback(inflight: dict[int, asyncio.Task[None]], kg: int) -> Callable[[asyncio.Task[None]], None]:
        def done(_task: asyncio.Task[None]) -> None:
            inflight.pop(kg, None)

        return done

    async def _chunk(self, kg: int, entries: list[Any]) -> None:
        """Submit one chunk of a group; move the group's cursor only if it committed. Never raises: a chunk that
        cannot even be prepared (a bug) is logged and read again later."""
        try:
            await self._submit_chunk(kg, entries)
        except Exception as e:  # noqa: BLE001 - the cursor stays: read again after a pause
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            log.exception("partition %d: a chunk could not be handled; reading it again in 1 s", kg)
            await asyncio.sleep(1.0)

    async def _submit_chunk(self, kg: int, entries: list[Any]) -> None:
        events: list[Any] = []
        rejected: list[bytes] = []
        campaigns = self.campaigns
        n = self.key_groups
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            evs, reason = decode_entry(fields or {})
            if reason:
                rejected.append(rejection(eid, kg, fields.get(b"events") or fields.get(b"event") or b"", reason))
                continue
            for ev in evs:
                if isinstance(ev, Rejected):
                    rejected.append(rejection_of(eid, kg, ev))
                elif ev.campaign not in campaigns:
                    rejected.append(rejection(eid, kg, as_dict(ev), f"campaign: unknown campaign {ev.campaign!r}"))
                elif n is not None and (right := key_group(user_key(ev.campaign, ev.user), n)) != kg:
                    # a producer that partitions wrongly: deciding it here would break the user's order and the
                    # ownership of its group (and fail the whole batch beside it)
                    rejected.append(rejection(eid, kg, as_dict(ev), f"partition: the user's events belong in "
                                                                    f"partition {right}, not {kg}"))
                else:
                    events.append(ev)
        first = entries[0][0].decode() if isinstance(entries[0][0], bytes) else entries[0][0]
        last = entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else entries[-1][0]
        try:
            await self.submit(events, (kg, last), rejected)
        except Exception as e:  # noqa: BLE001 - not committed: the cursor stays, the chunk is read again
            self.stats["failed_chunks"] += 1
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            if is_transient(e):
                log.warning("partition %d: chunk of %d events not committed (%s); reading it again", kg,
                            len(events), e)
                await asyncio.sleep(0.2)
                return
            n = self.failures[(kg, first)] = self.failures.get((kg, first), 0) + 1
            log.warning("partition %d: chunk at %s failed %d times: %s", kg, first, n, e)
            if len(entries) > 1:
                self.single.add(kg)  # find the entry that fails: one at a time
            elif n >= POISON_AFTER:
                await self._reject_poison(kg, entries[0], e)
            await asyncio.sleep(0.2)
            return
        self.cursors[kg] = last
        self.failures.pop((kg, first), None)
        if len(entries) == 1 and kg in self.single and not any(k[0] == kg for k in self.failures):
            self.single.discard(kg)
        self.stats["events"] += len(events)
        self.stats["chunks"] += 1
        self.stats["rejected"] += len(rejected)

    async def _reject_poison(self, kg: int, entry: Any, error: BaseException) -> None:
        """Commit the offset past an entry that keeps failing alone, with the entry in playbus:rejected."""
        eid = entry[0].decode() if isinstance(entry[0], bytes) else entry[0]
        fields = entry[1] or {}
        reason = f"processing failed {POISON_AFTER} times: {type(error).__name__}: {error}"[:1000]
        record = rejection(eid, kg, fields.get(b"events") or fields.get(b"event") or b"", reason)
        try:
            await self.submit([], (kg, eid), [record])
        except Exception as e:  # noqa: BLE001 - tried again on the next read
            log.warning("partition %d: could not reject poison entry %s: %s", kg, eid, e)
            return
        log.error("partition %d: entry %s is poison, moved to playbus:rejected: %s", kg, eid, reason)
        self.cursors[kg] = eid
        self.failures.pop((kg, eid), None)
        self.single.discard(kg)
        self.stats["poison"] += 1

    async def close(self) -> None:
        await self.client.aclose()
