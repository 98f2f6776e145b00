"""UserActivityActor: the Ray actor of one shard, a thin asyncio wrapper around ShardCore and MicroBatcher.

Concurrent callers (HTTP ingress replicas, the stream reader) are merged into micro-batches of up to
`batch.max_events`, waiting at most `batch.max_wait_ms` (service/batcher.py); each batch is one commit, and
every caller gets its own results only after that commit. Ray restarts a killed actor; its callers retry
(dedup makes it safe).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import Any

import msgspec
import ray
from ray.util import metrics

from playbus.actors.engine.events import decode_events
from playbus.actors.service.batcher import MicroBatcher
from playbus.actors.service.partition_reader import PartitionReader
from playbus.actors.service.shard import PreparedBatch, ShardCore
from playbus.actors.store.errors import FencedError
from playbus.config.schema import Config

__all__ = ["UserActivityActor"]

log = logging.getLogger("playbus.shard")
_encode = msgspec.msgpack.Encoder().encode
STUCK_AFTER_S = 30.0  # a caller waiting this long for its batch makes the shard unhealthy


class _UserActivityActor:
    def __init__(self, config: Config, shard: int, redis_url: str) -> None:
        # The engine allocates many short-lived acyclic dicts; a relaxed cyclic GC saves ~25% CPU.
        gc.set_threshold(50_000, 50, 100)
        self.core = ShardCore(config, shard, redis_url)
        self.batcher = MicroBatcher(self.core, config.batch.max_events, config.batch.max_wait_ms / 1000,
                                    on_committed=self._record)
        self.reader = PartitionReader(redis_url, sorted(self.core.groups), self._submit_read,
                                      {c.id for c in config.campaigns}, chunk=config.batch.max_events,
                                      key_groups=config.key_groups)
        self._reader_task: asyncio.Task[None] | None = None
        self._reader_stop: asyncio.Event | None = None
        self.reader_restarts = 0
        self._exiting = False
        tags = {"shard": str(shard)}
        self._m_events = metrics.Counter("playbus_events", "events by result status", tag_keys=("shard", "status"))
        self._m_rule_errors = metrics.Counter("playbus_rule_errors", "failed rule runs", tag_keys=("shard",))
        self._m_batch = metrics.Histogram("playbus_batch_events", "events per micro-batch",
                                          boundaries=[1, 10, 50, 100, 250, 500, 1000, 5000], tag_keys=("shard",))
        self._m_commit = metrics.Histogram("playbus_commit_ms", "commit latency (ms)",
                                           boundaries=[0.5, 1, 2, 5, 10, 20, 50, 100, 500], tag_keys=("shard",))
        self._m_queue = metrics.Gauge("playbus_queue_events", "events waiting for a batch", tag_keys=("shard",))
        for m in (self._m_events, self._m_rule_errors, self._m_batch, self._m_commit, self._m_queue):
            m.set_default_tags(tags)

    def _record(self, batch: PreparedBatch) -> None:
        """Metrics of one committed batch: a handful of calls per batch, none per event."""
        results: list[dict[str, Any]] = batch.results
        counts = {"applied": 0, "duplicate": 0, "rejected": 0}
        errors = 0
        for r in results:
            counts[r["status"]] += 1
            if r["errors"] and r["status"] == "applied":
                errors += len(r["errors"])
        for status, n in counts.items():
            if n:
                self._m_events.inc(n, tags={"status": status})
        if errors:
            self._m_rule_errors.inc(errors)
        self._m_batch.observe(len(results))
        self._m_commit.observe(self.core.last_commit_ms)
        self._m_queue.set(self.batcher.queued)

    async def process(self, payload: bytes) -> bytes:
        """msgpack list of events in, msgpack list of results out (after the durable commit)."""
        results = await self.process_events(decode_events(payload))
        return _encode(results)

    async def process_events(self, events: list[Any]) -> list[dict[str, Any]]:
        self._ensure_reader()
        try:
            return await self.batcher.submit(events)
        except FencedError:
            self._exit_fenced()
            raise

    def _exit_fenced(self) -> None:
        """A newer owner claimed our key groups: this process is a zombie. Exit (a crash, so that Ray restarts
        the actor, and the new incarnation claims its groups with a higher epoch); the callers retry."""
        if not self._exiting:
            self._exiting = True
            log.error("shard %d is fenced: exiting so that Ray restarts it", self.core.shard)
            asyncio.get_running_loop().call_later(0.2, os._exit, 1)

    async def put_script(self, name: str, source: str, version: int) -> int:
        self.core.put_script(name, source, version)
        return version

    async def activate(self, name: str, version: int) -> int:
        self.core.activate(name, version)
        return version

    async def context(self, campaign: str, user: str) -> dict[str, Any]:
        return self.core.context(campaign, user)

    # -- the input partitions --------------------------------------------------------------------------
    async def _submit_read(self, events: list[Any], offset: tuple[int, str], rejected: list[bytes]) -> list[Any]:
        try:
            return await self.batcher.submit(events, offset, rejected)
        except FencedError:
            self._exit_fenced()
            raise

    def _ensure_reader(self) -> None:
        """Start the partition reader (on the actor's event loop), and start it again if it died."""
        if self._reader_task is not None and not self._reader_task.done() or self._exiting:
            return
        if self._reader_task is not None:
            self.reader_restarts += 1
            exc = None if self._reader_task.cancelled() else self._reader_task.exception()
            log.error("shard %d: the partition reader stopped (%r); starting it again", self.core.shard, exc)
        self._reader_stop = asyncio.Event()
        self._reader_task = asyncio.get_running_loop().create_task(self.reader.run(self._reader_stop))

    async def start(self) -> bool:
        """Start reading the input partitions (idempotent; health and process calls do it too)."""
        self._ensure_reader()
        return True

    async def health(self) -> dict[str, Any]:
        self._ensure_reader()
        h = self.core.health()
        running = self._reader_task is not None and not self._reader_task.done()
        h["reader"] = {"running": running, "restarts": self.reader_restarts, "last_error": self.reader.last_error,
                       **self.reader.stats}
        if not running:
            h["ok"] = False
            h["problems"].append("the partition reader is not running")
        h["queued"] = self.batcher.queued
        waited = self.batcher.oldest_wait_s()
        h["oldest_wait_s"] = round(waited, 3)
        if waited > STUCK_AFTER_S:
            h["ok"] = False
            h["problems"].append(f"stuck: a caller has waited {waited:.0f} s for its batch")
        return h

    async def commit_latencies(self) -> list[float]:
        return list(self.core.commit_ms)

    async def stats(self) -> dict[str, Any]:
        """Counters for benchmarks and tools (no Redis call): events and batches committed, users in memory, pid."""
        return {"events": self.core.events, "batches": self.core.batches, "users": len(self.core.engine.users),
                "pid": os.getpid(), "queued": self.batcher.queued}

    async def cpu_seconds(self) -> float:
        """CPU time of this shard's process (all threads), for benchmarks."""
        return time.process_time()

    async def reset_stats(self) -> None:
        self.core.commit_ms.clear()

    async def close(self) -> None:
        """Stop reading, let queued batches commit, give budget leases back."""
        if self._reader_stop is not None and self._reader_task is not None:
            self._reader_stop.set()
            try:
                await asyncio.wait_for(self._reader_task, 30)
            except Exception as e:  # noqa: BLE001 - a reader that died or hangs must not keep the batches back
                log.warning("shard %d: the partition reader did not stop cleanly: %r", self.core.shard, e)
        await self.batcher.drain()
        self.core.close()


UserActivityActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000)(  # type: ignore[call-overload]
    _UserActivityActor
)
