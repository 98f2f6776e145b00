"""StreamProducer: the high-volume path, events XADDed to the Redis streams that playbus reads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack

__all__ = ["StreamProducer"]


class StreamProducer:
    """The high-volume path: XADD events to `playbus:in` (field "event" = msgpack), pipelined.

    `redis_client` is a redis-py client of the Redis that playbus uses. XADD is not idempotent: a
    producer that resends after an error may add an entry twice, and playbus answers the copy
    `duplicate` by its id, so keep ids stable across resends.
    """

    def __init__(self, redis_client: Any, stream: str = "playbus:in", chunk: int = 1000) -> None:
        self.client = redis_client
        self.stream = stream
        self.chunk = chunk

    def send(self, event: dict[str, Any]) -> Any:
        """XADD one event; returns its entry id."""
        return self.client.xadd(self.stream, {"event": msgpack.packb(event)})

    def send_many(self, events: Iterable[dict[str, Any]]) -> list[Any]:
        """XADD events in pipelines of `chunk` (one round trip each); returns their entry ids in order."""
        ids: list[Any] = []
        pipe = self.client.pipeline(transaction=False)
        queued = 0
        for e in events:
            pipe.xadd(self.stream, {"event": msgpack.packb(e)})
            queued += 1
            if queued >= self.chunk:
                ids.extend(pipe.execute())
                queued = 0
        if queued:
            ids.extend(pipe.execute())
        return ids
