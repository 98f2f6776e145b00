"""InputRouter: simple producers XADD single events to `playbus:in`; the router appends them to the input partitions
(`playbus:{kgN}:in`, record batches) that the shards read.

    playbus:in          what simple producers add (field "event" = one event, JSON or msgpack)
    playbus:in:offset   the last `playbus:in` entry routed

One router reads `playbus:in` from its offset, a batch at a time and in order, so a user's events keep their order
into their partition. Routing a batch is one MULTI/EXEC: its record batches (one per partition), the rejections
of what cannot be read as events, the new offset, and the trim of the routed entries from `playbus:in`; so an entry
is routed exactly once, whenever the router stops. Entries that cannot be read as events go to `playbus:rejected`
with the reason.

Earlier versions read with a consumer group (`playbus`) and deleted each entry once routed; what such a router left
in the stream is exactly what it had not routed yet, so without an offset the router starts at the beginning.

On a Redis Cluster `playbus:in`, its offset and the partitions are in different slots, so routing a batch is no
transaction: the record batches and rejections are added first, then the offset is moved, then the routed entries
are trimmed. A router stopped in between routes those entries again: at least once, each event with its own id,
which the target user's dedup answers `duplicate` (so each is decided once), and a user's events keep their order
(the repeats come after the first copies). A rejection may then be recorded twice in `playbus:rejected`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from playbus.actors.engine.events import (
    EventIn,
    Rejected,
    decode_event_raw,
    encode_event,
    from_gameplays,
    msgpack_array,
)
from playbus.actors.engine.keys import group_prefix, key_group, user_key
from playbus.actors.service.partition_reader import MAX_EVENT, decode_entry, rejection, rejection_of
from playbus.actors.store.commit import REJECTED_STREAM
from playbus.actors.store.connect import connect_async, is_cluster

__all__ = ["IN_OFFSET", "IN_STREAM", "REJECTED_STREAM", "InputRouter", "next_id"]

log = logging.getLogger("playbus.router")
IN_STREAM = "playbus:in"
IN_OFFSET = "playbus:in:offset"
LEGACY_GROUP = "playbus"  # the consumer group routers used to read with


def next_id(entry_id: bytes) -> bytes:
    """The smallest stream id after `entry_id` (for XTRIM MINID, which keeps ids >= its argument)."""
    ms, _, seq = entry_id.partition(b"-")
    return ms + b"-" + str(int(seq or b"0") + 1).encode()


class InputRouter:
    """Routes `playbus:in` into the partitions of `key_groups` groups until `stop` is set."""

    def __init__(self, redis_url: str, key_groups: int, count: int = 2000, block_ms: int = 100) -> None:
        self.client = connect_async(redis_url, socket_timeout=30)
        self.cluster = is_cluster(redis_url)
        # XREAD answers as Redis sends it (lists of [id, [field, value, ...]]): redis-py's own parsing makes a dict
        # per entry, which was a tenth of the router's CPU.
        self.client.set_response_callback("XREAD", lambda response, **_: response)
        self.key_groups = key_groups
        self.count = count
        self.block_ms = block_ms
        self.offset: bytes | None = None
        self.stats = {"routed": 0, "rejected": 0, "batches": 0}
        self.last_error = ""

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if self.offset is None:
                    stored: Any = await self.client.get(IN_OFFSET)
                    self.offset = stored
                    if self.offset is None:
                        await self._retire_group()
                        self.offset = b"0-0"
                resp: Any = await self._read()
                if resp:  # [[stream, entries]] (RESP2), {stream: entries} (RESP3)
                    await self.route(next(iter(resp.values())) if isinstance(resp, dict) else resp[0][1])
            except (OSError, RedisError, RedisClusterException) as e:
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("input router: redis unavailable (%s); retrying", e)
                self.offset = None  # read the committed offset again: what was not routed is read again, in order
                await asyncio.sleep(0.5)

    async def _read(self) -> Any:
        if not self.cluster:
            return await self.client.xread({IN_STREAM: self.offset}, count=self.count, block=self.block_ms)
        # XREAD's keys cannot be read off its arguments cheaply (redis-py would ask the server each time): route it
        await self.client.initialize()
        return await self.client.execute_command("XREAD", "COUNT", self.count, "BLOCK", self.block_ms, "STREAMS",
                                                 IN_STREAM, self.offset,
                                                 target_nodes=self.client.get_node_from_key(IN_STREAM))

    async def _retire_group(self) -> None:
        """Drop the consumer group of an earlier version's router (what it left in the stream is unrouted)."""
        try:
            await self.client.xgroup_destroy(IN_STREAM, LEGACY_GROUP)
        except RedisError:
            pass  # no stream, or no such group

    async def route(self, entries: list[Any]) -> None:
        """Route one batch of `playbus:in` entries ([id, [field, value, ...]] each) in one transaction. A valid
        msgpack event is passed on as it arrived (checked, not encoded again); anything else takes the slow road
        (JSON, a record batch, what is rejected)."""
        by_group: dict[int, list[bytes]] = {}
        rejected: list[bytes] = []
        n = self.key_groups
        routed = 0
        for entry_id, flat in entries:
            if not flat:
                continue
            if len(flat) == 2 and flat[0] == b"event" and len(flat[1]) <= MAX_EVENT:
                ev = decode_event_raw(flat[1])
                if ev is not None and not ev.depth and ev.cause is None:
                    kg = key_group(user_key(ev.campaign, ev.user), n)
                    group = by_group.get(kg)
                    if group is None:
                        by_group[kg] = [flat[1]]
                    else:
                        group.append(flat[1])
                    routed += 1
                    continue
            fields = dict(zip(flat[::2], flat[1::2], strict=False))
            events, reason = decode_entry(fields)
            if reason:
                rejected.append(rejection(entry_id.decode(), None, fields.get(b"event") or b"", reason))
                continue
            for e in from_gameplays(events):
                if type(e) is Rejected:
                    rejected.append(rejection_of(entry_id.decode(), None, e))
                    continue
                assert type(e) is EventIn
                by_group.setdefault(key_group(user_key(e.campaign, e.user), n), []).append(encode_event(e))
                routed += 1
        last = entries[-1][0]
        pipe = self.client.pipeline(transaction=not self.cluster)
        for kg, group_events in by_group.items():
            pipe.xadd(group_prefix(kg) + "in", {"events": msgpack_array(group_events)})
        for record in rejected:
            pipe.xadd(REJECTED_STREAM, {"rejected": record})
        if self.cluster:  # three slots: add, then move the offset, then trim (see the module doc)
            await pipe.execute()
            await self.client.set(IN_OFFSET, last)
            await self.client.xtrim(IN_STREAM, minid=next_id(last), approximate=False)
        else:
            pipe.set(IN_OFFSET, last)
            pipe.xtrim(IN_STREAM, minid=next_id(last), approximate=False)
            await pipe.execute()
        self.offset = last
        self.stats["routed"] += routed
        self.stats["rejected"] += len(rejected)
        self.stats["batches"] += 1

    async def close(self) -> None:
        await self.client.aclose()
