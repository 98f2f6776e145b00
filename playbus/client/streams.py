"""StreamProducer: the high-volume path, events written straight into the input partitions that the shards read.

playbus's input is a partitioned log, like Kafka's: one Redis stream per key group, `playbus:{kg<N>}:in`, read
by the shard that owns the group. The partition of an event is the key group of its (campaign, user):

    partition = crc32(campaign + "\\x00" + user, as UTF-8) % key_groups

(`key_groups` is fixed for the life of the data; playbus records it in Redis, `HGET playbus:{meta}:layout
key_groups`). An entry carries a record batch: field "events" = a msgpack array of events of that partition,
added in one XADD, so Redis pays per batch, not per event. Per user, events are decided in the order they were
added. Any producer can do the same; producers that cannot partition may XADD single events to `playbus:in`
(field "event" = JSON or msgpack), which playbus routes into the partitions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from zlib import crc32

import msgpack

__all__ = ["LAYOUT_KEY", "StreamProducer", "partition_of", "partition_stream"]

LAYOUT_KEY = "playbus:{meta}:layout"


def partition_of(campaign: str, user: str, key_groups: int) -> int:
    """The partition (key group) of a (campaign, user): the same function as playbus's own."""
    return crc32(f"{campaign}\x00{user}".encode()) % key_groups


def partition_stream(partition: int) -> str:
    """The Redis stream of a partition."""
    return f"playbus:{{kg{partition}}}:in"


class StreamProducer:
    """Writes events to the input partitions, as record batches of up to `batch` events, in pipelines.

    `redis_client` is a redis-py client (or cluster client) of the Redis that playbus uses. XADD is not
    idempotent: a producer that resends after an error may add events twice, and playbus answers the copies
    `duplicate` by their ids, so keep ids stable across resends. `key_groups` defaults to what playbus recorded
    in Redis (it must have started once); pass it to write before that (a value that differs from the recorded
    one raises ValueError).
    """

    def __init__(self, redis_client: Any, key_groups: int | None = None, batch: int = 500,
                 pipeline: int = 64) -> None:
        if not 1 <= batch <= 10_000:
            raise ValueError(f"batch must be 1..10000 events, got {batch}")
        self.client = redis_client
        self._key_groups = key_groups
        self._checked = False  # key_groups compared with what playbus recorded (before playbus ever ran: not)
        self.batch = batch
        self.pipeline = pipeline  # record batches per round trip

    @property
    def key_groups(self) -> int:
        """The number of partitions: what playbus recorded in Redis. A `key_groups` given to the constructor
        is checked against it once (events in wrong partitions would be rejected by playbus)."""
        if not self._checked:
            raw = self.client.hget(LAYOUT_KEY, "key_groups")
            if raw is None and self._key_groups is None:
                raise RuntimeError("playbus has not recorded its key_groups in this Redis yet (start it once, "
                                   "or pass key_groups=)")
            if raw is not None:
                if self._key_groups is not None and int(raw) != self._key_groups:
                    raise ValueError(f"key_groups={self._key_groups} given, but playbus uses {int(raw)} in this "
                                     f"Redis: events would go to the wrong partitions")
                self._key_groups = int(raw)
            self._checked = True
        assert self._key_groups is not None
        return self._key_groups

    def send(self, event: dict[str, Any]) -> Any:
        """One event in its partition; its entry id."""
        return self.send_many([event])[0]

    def send_many(self, events: Iterable[dict[str, Any]]) -> list[Any]:
        """Add events to their partitions, a record batch of up to `batch` events per partition and entry, in
        pipelines; returns once all are added, with the entry id of each event's record batch, in order."""
        n = self.key_groups
        events = list(events)
        by_part: dict[int, list[int]] = {}
        for i, e in enumerate(events):
            by_part.setdefault(partition_of(e["campaign"], e["user"], n), []).append(i)
        ids: list[Any] = [None] * len(events)
        pipe = self.client.pipeline(transaction=False)
        queued: list[list[int]] = []
        for part, idx in by_part.items():
            for start in range(0, len(idx), self.batch):
                chunk = idx[start:start + self.batch]
                pipe.xadd(partition_stream(part), {"events": msgpack.packb([events[i] for i in chunk])})
                queued.append(chunk)
                if len(queued) >= self.pipeline:
                    self._flush(pipe, queued, ids)
                    queued = []
        if queued:
            self._flush(pipe, queued, ids)
        return ids

    @staticmethod
    def _flush(pipe: Any, queued: list[list[int]], ids: list[Any]) -> None:
        for chunk, entry in zip(queued, pipe.execute(), strict=True):
            for i in chunk:
                ids[i] = entry
