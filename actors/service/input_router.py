"""InputRouter: simple producers XADD single events to `playbus:in`; the router appends them to the input partitions
(`playbus:{kgN}:in`, record batches) that the shards read, then acknowledges them.

One router reads `playbus:in` with a consumer group, a batch at a time and in order, so a user's events keep their
order into their partition. It acknowledges a batch only after its events are in their partitions: a crash in
between routes them again, and the shards answer the copies `duplicate` by their ids. Entries that cannot be read
as events go to `playbus:rejected` with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from playbus.actors.engine.events import EventIn, Rejected, encode_events
from playbus.actors.engine.keys import group_prefix, key_group, user_key
from playbus.actors.service.partition_reader import decode_entry, rejection
from playbus.actors.store.commit import REJECTED_STREAM

__all__ = ["GROUP", "IN_STREAM", "REJECTED_STREAM", "InputRouter"]

log = logging.getLogger("playbus.router")
IN_STREAM = "playbus:in"
GROUP = "playbus"


class InputRouter:
    """Routes `playbus:in` into the partitions of `key_groups` groups until `stop` is set."""

    def __init__(self, redis_url: str, key_groups: int, consumer: str = "router-0", count: int = 1000) -> None:
        self.client = aioredis.Redis.from_url(redis_url, socket_timeout=30)
        self.key_groups = key_groups
        self.consumer = consumer
        self.count = count
        self.stats = {"routed": 0, "rejected": 0, "batches": 0}
        self.last_error = ""

    async def _ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(IN_STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        await self._ensure_group()
        cursor = "0"  # first this consumer's pending entries (a restart), then new ones (">")
        while not stop.is_set():
            try:
                resp: Any = await self.client.xreadgroup(GROUP, self.consumer, {IN_STREAM: cursor},
                                                         count=self.count, block=None if cursor != ">" else 200)
                entries = resp[0][1] if resp else []
                if cursor != ">" and not entries:
                    cursor = ">"
                    continue
                if entries:
                    await self.route(entries)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                await self._ensure_group()  # the stream or the group was deleted
                cursor = "0"
            except (OSError, RedisError) as e:
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("input router: redis unavailable (%s); retrying", e)
                cursor = "0"  # what was read and not acknowledged is read again, in order
                await asyncio.sleep(0.5)

    async def route(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Append one batch of `playbus:in` entries to their partitions (one record batch per partition), reject
        what cannot be read, acknowledge and delete them: one pipeline."""
        by_group: dict[int, list[EventIn]] = {}
        rejected: list[bytes] = []
        for entry_id, fields in entries:
            eid = entry_id.decode()
            if not fields:
                continue  # deleted while pending: just acknowledge it
            events, reason = decode_entry(fields)
            if reason:
                rejected.append(rejection(eid, None, fields.get(b"event") or b"", reason))
                continue
            for ev in events:
                if isinstance(ev, Rejected):
                    rejected.append(rejection(eid, None, ev.raw if ev.raw is not None else {"id": ev.id}, ev.reason))
                    continue
                by_group.setdefault(key_group(user_key(ev.campaign, ev.user), self.key_groups), []).append(ev)
        pipe = self.client.pipeline(transaction=False)
        for kg, group_events in by_group.items():
            pipe.xadd(group_prefix(kg) + "in", {"events": encode_events(group_events)})
        for record in rejected:
            pipe.xadd(REJECTED_STREAM, {"rejected": record})
        ids = [eid for eid, _ in entries]
        pipe.xack(IN_STREAM, GROUP, *ids)
        pipe.xdel(IN_STREAM, *ids)
        await pipe.execute()
        self.stats["routed"] += sum(len(v) for v in by_group.values())
        self.stats["rejected"] += len(rejected)
        self.stats["batches"] += 1

    async def close(self) -> None:
        await self.client.aclose()
