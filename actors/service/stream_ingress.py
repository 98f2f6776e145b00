"""Stream ingress: bulk producers XADD events to `playbus:in`; this reader feeds them to the shards.

Entries are read with a consumer group in batches (COUNT >= 500), routed like HTTP events, acknowledged
only after the shards committed them; a restarted reader first re-reads its own pending entries and claims
those of dead readers, and dedup (committed with the state) turns a re-read into `duplicate`. Invalid
events go to `playbus:rejected` with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from playbus.actors.engine.errors import PlaybusError
from playbus.actors.service.router import Router

__all__ = ["IN_STREAM", "REJECTED_STREAM", "StreamIngress", "decode_entry"]

log = logging.getLogger("playbus.stream")
IN_STREAM = "playbus:in"
REJECTED_STREAM = "playbus:rejected"
GROUP = "playbus"
POISON_AFTER = 3  # failures of an entry processed alone, for reasons other than an outage, before it is rejected
ShardCall = Callable[[int, str, Sequence[Any]], Awaitable[Any]]


def decode_entry(fields: dict[bytes, bytes]) -> tuple[Any, str]:
    """(event, "") or (None, reason) for one stream entry (field "event": JSON or msgpack)."""
    raw = fields.get(b"event")
    if raw is None:
        return None, 'entry has no field "event"'
    if len(raw) > 64 * 1024:
        return None, f"event of {len(raw)} bytes is too large"
    try:
        if raw.lstrip()[:1] in (b"{", b"["):
            return json.loads(raw), ""
        return msgpack.unpackb(raw, raw=False, strict_map_key=False), ""
    except Exception as e:  # noqa: BLE001 - any decoding failure is a rejection
        return None, f"event is neither JSON nor msgpack: {e}"


class StreamIngress:
    """Reads `playbus:in` and calls the shards; `run()` until `stop` is set."""

    def __init__(self, redis_url: str, router: Router, call_shard: ShardCall, consumer: str = "reader-0",
                 count: int = 1000, inflight: int = 4, claim_idle_ms: int = 30_000) -> None:
        self.client = aioredis.Redis.from_url(redis_url)
        self.router = router
        self.call_shard = call_shard
        self.consumer = consumer
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self._slots = asyncio.Semaphore(inflight)
        self.applied = self.duplicates = self.rejected = self.batches = self.poison = 0
        self.failures: dict[bytes, int] = {}  # entry id -> non-transient failures of its processing
        self._reread = False

    async def _ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(IN_STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        await self._ensure_group()
        tasks: set[asyncio.Task[None]] = set()
        # First our own pending entries (a restart), then entries of readers that died, then new ones.
        # The cursors move on past what was read, so an entry still in flight is never read again.
        phase, cursor = "own", "0"
        resp: Any
        entries: Any
        while not stop.is_set():
            if self._reread:
                # A batch failed and is still pending under our name: read our pending entries again,
                # once the batches in flight are done (else they would be read twice).
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                self._reread = False
                phase, cursor = "own", "0"
                await asyncio.sleep(0.5)
            try:
                if phase == "own":
                    resp = await self.client.xreadgroup(GROUP, self.consumer, {IN_STREAM: cursor}, count=self.count)
                    entries = resp[0][1] if resp else []
                    if entries:
                        cursor = entries[-1][0]
                    else:
                        phase, cursor = "claim", "0-0"
                elif phase == "claim":
                    claimed: Any = await self.client.xautoclaim(IN_STREAM, GROUP, self.consumer,
                                                           self.claim_idle_ms, cursor, count=self.count)
                    cursor, entries = claimed[0], claimed[1]
                    if cursor in (b"0-0", "0-0"):
                        phase = "new"
                else:
                    resp = await self.client.xreadgroup(GROUP, self.consumer, {IN_STREAM: ">"},
                                                        count=self.count, block=200)
                    entries = resp[0][1] if resp else []
            except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as e:
                log.warning("stream ingress: redis unavailable (%s); retrying", e)
                await asyncio.sleep(0.5)
                continue
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                await self._ensure_group()  # the stream or the group was deleted (e.g. a Redis without data)
                phase, cursor = "own", "0"
                continue
            if not entries:
                continue
            await self._slots.acquire()
            t = asyncio.get_running_loop().create_task(self._handle(entries))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        try:
            if any(eid in self.failures for eid, _ in entries):
                for entry in entries:  # entries that failed before go one by one, so a poison one is found
                    await self._handle_one([entry])
            else:
                await self._handle_one(entries)
        finally:
            self._slots.release()

    async def _handle_one(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        try:
            await self.handle_entries(entries)
        except Exception as e:  # noqa: BLE001 - left pending: re-read after a restart or a claim
            if not is_transient(e):
                for eid, _ in entries:
                    self.failures[eid] = self.failures.get(eid, 0) + 1
                if len(entries) == 1 and self.failures[entries[0][0]] >= POISON_AFTER:
                    await self._dead_letter(entries[0], e)
                    return
            log.warning("stream ingress: batch of %d left pending: %s", len(entries), e)
            self._reread = True
            return
        for eid, _ in entries:
            self.failures.pop(eid, None)

    async def _dead_letter(self, entry: tuple[bytes, dict[bytes, bytes]], error: Exception) -> None:
        """A poison entry (its processing failed POISON_AFTER times, alone, for a reason other than an outage):
        to `playbus:rejected` with the reason, then acknowledged, so that the entries behind it go on."""
        eid, fields = entry
        reason = f"processing failed {self.failures.get(eid, 0)} times: {type(error).__name__}: {error}"[:1000]
        log.error("stream ingress: entry %r is poison, moved to %s: %s", eid, REJECTED_STREAM, reason)
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(REJECTED_STREAM, {"entry": eid, "event": (fields.get(b"event") or b"")[:65536], "reason": reason})
        pipe.xack(IN_STREAM, GROUP, eid)
        pipe.xdel(IN_STREAM, eid)
        await pipe.execute()
        self.failures.pop(eid, None)
        self.rejected += 1
        self.poison += 1

    async def handle_entries(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        ids, events, bad = [], [], []
        for eid, fields in entries:
            if not fields:
                continue  # deleted while pending (XADD cannot add an entry without fields): just ack it
            ev, reason = decode_entry(fields)
            if reason:
                bad.append((eid, fields.get(b"event", b""), reason))
            else:
                ids.append(eid)
                events.append(ev)
        results = await self.router.dispatch(events, self.call_shard) if events else []
        pipe = self.client.pipeline(transaction=False)
        for eid, raw, reason in bad:
            pipe.xadd(REJECTED_STREAM, {"entry": eid, "event": raw[:65536], "reason": reason})
        for eid, ev, r in zip(ids, events, results, strict=False):
            if r["status"] == "rejected":
                pipe.xadd(REJECTED_STREAM, {"entry": eid, "event": json.dumps(ev, default=str)[:65536],
                                            "reason": "; ".join(r["errors"])})
                self.rejected += 1
            elif r["status"] == "duplicate":
                self.duplicates += 1
            else:
                self.applied += 1
        self.rejected += len(bad)
        all_ids = [eid for eid, _ in entries]
        pipe.xack(IN_STREAM, GROUP, *all_ids)
        pipe.xdel(IN_STREAM, *all_ids)
        await pipe.execute()
        self.batches += 1

    def stats(self) -> dict[str, int]:
        return {"applied": self.applied, "duplicates": self.duplicates, "rejected": self.rejected,
                "batches": self.batches, "poison": self.poison}


def is_transient(error: BaseException) -> bool:
    """An outage (Redis, a shard restarting, a timeout, a batch to retry) rather than something about the entry."""
    return isinstance(error, (OSError, TimeoutError, asyncio.TimeoutError, RedisError, PlaybusError))
