"""UserActivityActor: the Ray actor of one shard, a thin asyncio wrapper around ShardCore.

Concurrent callers (HTTP ingress replicas, the stream reader) are merged into micro-batches of up to
`batch.max_events`, waiting at most `batch.max_wait_ms`; each batch is one commit, and every caller gets its
own results only after that commit. Ray restarts a killed actor; its callers retry (dedup makes it safe).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import ray
from ray.util import metrics

from playbus.actors.engine.errors import EngineError
from playbus.actors.service.shard import PreparedBatch, ShardCore
from playbus.config.schema import Config

__all__ = ["UserActivityActor"]

log = logging.getLogger("playbus.shard")


class _UserActivityActor:
    def __init__(self, config: Config, shard: int, redis_url: str) -> None:
        # The engine allocates many short-lived acyclic dicts; a relaxed cyclic GC saves ~25% CPU.
        gc.set_threshold(50_000, 50, 100)
        self.core = ShardCore(config, shard, redis_url)
        self.max_events = config.batch.max_events
        self.max_wait = config.batch.max_wait_ms / 1000
        self._pending: list[tuple[list[Any], asyncio.Future[list[dict[str, Any]]]]] = []
        self._pending_n = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")  # one: commits stay ordered
        self._inflight: tuple[asyncio.Future[None], PreparedBatch, list[Any]] | None = None
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

    def _record(self, results: list[dict[str, Any]]) -> None:
        """Metrics of one committed batch: a handful of calls per batch, none per event."""
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
        self._m_queue.set(self._pending_n)

    def _ensure_loop(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._flusher())

    async def process(self, payload: bytes) -> bytes:
        """msgpack list of events in, msgpack list of results out (after the durable commit)."""
        events = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        results = await self.process_events(events)
        reply: bytes = msgpack.packb(results)
        return reply

    async def process_events(self, events: list[Any]) -> list[dict[str, Any]]:
        self._ensure_loop()
        fut: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._pending.append((events, fut))
        self._pending_n += len(events)
        assert self._wake is not None
        self._wake.set()
        return await fut

    async def _flusher(self) -> None:
        """Cut batches and pipeline them: batch N+1 is decided while batch N commits on the commit thread.

        Callers of a batch are answered only after its own commit. If a commit fails, the batch decided on
        top of it fails too (its decisions saw state that never landed) and both batches' users are
        forgotten, so the callers' retries reload them from Redis.
        """
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._inflight is not None:
                    await self._settle()
                    continue
                await self._wake.wait()
                self._wake.clear()
                if self._pending_n < self.max_events and self.max_wait > 0:
                    await asyncio.sleep(self.max_wait)
                continue
            take, n = [], 0
            while self._pending and (n == 0 or n + len(self._pending[0][0]) <= self.max_events):
                item = self._pending.pop(0)
                take.append(item)
                n += len(item[0])
            self._pending_n -= n
            try:
                batch = self.core.prepare([e for evs, _ in take for e in evs])
            except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error
                self._fail(take, e)
                continue
            if self._inflight is not None and not await self._settle():
                self.core.forget(batch.dirty)
                self._fail(take, EngineError("the previous batch failed to commit; retry"))
                continue
            fut = loop.run_in_executor(self._committer, self.core.commit, batch)
            self._inflight = (fut, batch, take)
            await asyncio.sleep(0)  # let new callers in while the commit runs

    async def _settle(self) -> bool:
        """Wait for the commit in flight and answer its callers; False if it failed."""
        assert self._inflight is not None
        fut, batch, take = self._inflight
        self._inflight = None
        try:
            await fut
        except Exception as e:  # noqa: BLE001 - the callers retry; dedup makes that safe
            self.core.forget(batch.dirty)
            self._fail(take, e)
            return False
        self._record(batch.results)
        i = 0
        for evs, f in take:
            if not f.done():
                f.set_result(batch.results[i:i + len(evs)])
            i += len(evs)
        return True

    def _fail(self, take: list[tuple[list[Any], asyncio.Future[list[dict[str, Any]]]]], e: Exception) -> None:
        log.warning("shard %d: batch of %d events failed: %s", self.core.shard, sum(len(x) for x, _ in take), e)
        for _, f in take:
            if not f.done():
                f.set_exception(e)

    async def put_script(self, name: str, source: str, version: int) -> int:
        self.core.put_script(name, source, version)
        return version

    async def activate(self, name: str, version: int) -> int:
        self.core.activate(name, version)
        return version

    async def context(self, campaign: str, user: str) -> dict[str, Any]:
        return self.core.context(campaign, user)

    async def health(self) -> dict[str, Any]:
        h = self.core.health()
        h["queued"] = self._pending_n
        return h

    async def commit_latencies(self) -> list[float]:
        return list(self.core.commit_ms)

    async def cpu_seconds(self) -> float:
        """CPU time of this shard's process (all threads), for benchmarks."""
        return time.process_time()

    async def reset_stats(self) -> None:
        self.core.commit_ms.clear()

    async def close(self) -> None:
        while self._pending or self._inflight is not None:  # let queued batches commit first
            await asyncio.sleep(0.01)
        self.core.close()


UserActivityActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000)(  # type: ignore[call-overload]
    _UserActivityActor
)
