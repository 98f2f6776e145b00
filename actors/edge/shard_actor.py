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
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import ray
from ray.util import metrics

from playbus.actors.engine.events import decode_events
from playbus.actors.service.batcher import MicroBatcher
from playbus.actors.service.errors import NotOwner
from playbus.actors.service.partition_reader import PartitionReader
from playbus.actors.service.shard import PreparedBatch, ShardCore
from playbus.actors.service.timer_firer import TimerFirer
from playbus.actors.store.errors import FencedError
from playbus.config.schema import Config

__all__ = ["UserActivityActor"]

log = logging.getLogger("playbus.shard")
_encode = msgspec.msgpack.Encoder().encode
STUCK_AFTER_S = 30.0  # a caller waiting this long for its batch makes the shard unhealthy
RELEASE_BARRIER_S = 30.0  # how long a release waits for the batches already submitted to commit


class _UserActivityActor:
    def __init__(self, config: Config, shard: int, redis_url: str) -> None:
        # The engine allocates many short-lived acyclic dicts; a relaxed cyclic GC saves ~25% CPU.
        gc.set_threshold(50_000, 50, 100)
        self.core = ShardCore(config, shard, redis_url)
        self.batcher = MicroBatcher(self.core, config.batch.max_events, config.batch.max_wait_ms / 1000,
                                    on_committed=self._record)
        self.redis_url = redis_url
        self.reader, self.firer = self._readers()
        self._reader_task: asyncio.Task[None] | None = None
        self._reader_stop: asyncio.Event | None = None
        self._firer_task: asyncio.Task[None] | None = None
        self.restarts = {"partition reader": 0, "timer firer": 0}
        self._leaving: set[int] = set()  # groups being released: their events are refused from now
        self._moves = asyncio.Lock()  # one release or acquire at a time
        self._exiting = False
        tags = {"shard": str(shard)}
        self._m_events = metrics.Counter("playbus_events", "events by result status", tag_keys=("shard", "status"))
        self._m_rule_errors = metrics.Counter("playbus_rule_errors", "failed rule runs", tag_keys=("shard",))
        self._m_batch = metrics.Histogram("playbus_batch_events", "events per micro-batch",
                                          boundaries=[1, 10, 50, 100, 250, 500, 1000, 5000], tag_keys=("shard",))
        self._m_commit = metrics.Histogram("playbus_commit_ms", "commit latency (ms)",
                                           boundaries=[0.5, 1, 2, 5, 10, 20, 50, 100, 500], tag_keys=("shard",))
        self._m_queue = metrics.Gauge("playbus_queue_events", "events waiting for a batch", tag_keys=("shard",))
        self._m_made = metrics.Counter("playbus_rule_events", "events rules made and timers they changed",
                                       tag_keys=("shard", "kind"))  # kind: sent, timers_set, timers_cancelled, fired
        self._m_late = metrics.Histogram("playbus_timer_lateness_ms", "commit time minus due time of fired timers",
                                         boundaries=[10, 50, 100, 250, 500, 1000, 5000, 30000], tag_keys=("shard",))
        self._m_grants = metrics.Counter("playbus_grants", "actions granted", tag_keys=("shard", "campaign", "action"))
        self._m_refusals = metrics.Counter("playbus_refusals", "actions refused by a cap or a budget",
                                           tag_keys=("shard", "campaign", "reason"))
        self._m_campaign_errors = metrics.Counter("playbus_campaign_rule_errors", "failed rule runs",
                                                  tag_keys=("shard", "campaign", "rule", "version"))
        for m in (self._m_events, self._m_rule_errors, self._m_batch, self._m_commit, self._m_queue, self._m_made,
                  self._m_late, self._m_grants, self._m_refusals, self._m_campaign_errors):
            m.set_default_tags(tags)

    def _readers(self) -> tuple[PartitionReader, TimerFirer]:
        """A partition reader and a timer firer for the groups this shard owns now."""
        config, groups = self.core.config, sorted(self.core.groups)
        reader = PartitionReader(self.redis_url, groups, self._submit_read, self.core.campaign_ids,
                                 chunk=config.batch.max_events, key_groups=config.key_groups)
        firer = TimerFirer(self.redis_url, groups, self._submit_fired, poll_s=config.timers.poll_ms / 1000,
                           chunk=config.batch.max_events, on_fired=self._observe_lateness)
        old = getattr(self, "reader", None), getattr(self, "firer", None)
        if old[0] is not None and old[1] is not None:  # counters and lateness go on across a move
            reader.stats, firer.stats, firer.lateness_ms = old[0].stats, old[1].stats, old[1].lateness_ms
        return reader, firer

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
        for kind, n in batch.counts.items():
            self._m_made.inc(n, tags={"kind": kind})
        for key, n in batch.stats.items():  # per campaign: grants by action, refusals by cap or budget, failed runs
            campaign, kind, *rest = key.split("\x00")
            if kind == "grants":
                self._m_grants.inc(n, tags={"campaign": campaign, "action": rest[0]})
            elif kind == "refusals":
                self._m_refusals.inc(n, tags={"campaign": campaign, "reason": rest[0]})
            elif kind == "errors":
                self._m_campaign_errors.inc(n, tags={"campaign": campaign, "rule": rest[0], "version": rest[1]})
        self._m_batch.observe(len(results))
        self._m_commit.observe(self.core.last_commit_ms)
        self._m_queue.set(self.batcher.queued)

    def _observe_lateness(self, late_ms: list[float]) -> None:
        for ms in late_ms:
            self._m_late.observe(ms)

    async def process(self, payload: bytes) -> bytes:
        """msgpack list of events in, msgpack list of results out (after the durable commit)."""
        results = await self.process_events(decode_events(payload))
        return _encode(results)

    async def process_events(self, events: list[Any]) -> list[dict[str, Any]]:
        self._ensure_reader()
        groups = self.core.groups_of(events)
        foreign = (groups - self.core.groups) | (groups & self._leaving)
        if foreign:
            listed = ", ".join(map(str, sorted(foreign)[:10])) + (" ..." if len(foreign) > 10 else "")
            raise NotOwner(f"shard {self.core.shard} does not own key groups {listed} (the shard map changed): "
                           "read it again and send these events to their owner")
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

    async def activate(self, name: str, version: int, percent: float = 100) -> int:
        self.core.activate(name, version, percent)
        return version

    async def campaigns_changed(self) -> bool:
        """The campaigns' shared state changed (pause, resume, top-up): apply it before the next batch."""
        self.core.reconcile()
        return True

    async def budget_leases(self) -> dict[str, int]:
        """"campaign\x00budget" -> what this shard holds leased and has not spent (for campaign stats)."""
        return {f"{c}\x00{b}": n for (c, b), n in self.core.budgets.leased.items()}

    async def context(self, campaign: str, user: str) -> dict[str, Any]:
        return self.core.context(campaign, user)

    # -- the input partitions --------------------------------------------------------------------------
    async def _submit_read(self, events: list[Any], offset: tuple[int, str], rejected: list[bytes]) -> list[Any]:
        try:
            return await self.batcher.submit(events, offset, rejected)
        except FencedError:
            self._exit_fenced()
            raise

    async def _submit_fired(self, events: list[Any]) -> list[Any]:
        try:
            return await self.batcher.submit(events)
        except FencedError:
            self._exit_fenced()
            raise

    def _ensure_reader(self) -> None:
        """Start the partition reader and the timer firer (on the actor's event loop), and start again whichever
        died."""
        if self._exiting or self._moves.locked():  # a move restarts them itself when it is done
            return
        self._start_readers()

    def _start_readers(self) -> None:
        if self._reader_stop is None:
            self._reader_stop = asyncio.Event()
        if self.core.groups:
            self._reader_task = self._keep_running(self._reader_task, self.reader.run, "partition reader")
            self._firer_task = self._keep_running(self._firer_task, self.firer.run, "timer firer")
        else:  # a shard that owns no group (yet): nothing to read, and nothing wrong
            self._reader_task = self._keep_running(self._reader_task, _idle, "partition reader")
            self._firer_task = self._keep_running(self._firer_task, _idle, "timer firer")

    def _keep_running(self, task: asyncio.Task[None] | None, run: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
                      name: str) -> asyncio.Task[None]:
        """`task` while it runs, else `run` started (again, counted and logged when it had died)."""
        if task is not None and not task.done():
            return task
        if task is not None:
            self.restarts[name] += 1
            exc = None if task.cancelled() else task.exception()
            log.error("shard %d: the %s stopped (%r); starting it again", self.core.shard, name, exc)
        assert self._reader_stop is not None
        return asyncio.get_running_loop().create_task(run(self._reader_stop))

    # -- key-group moves (a rescale; actors/service/rescale.py) --------------------------------------------
    async def release(self, groups: list[int]) -> dict[str, Any]:
        """Hand these groups over: refuse their events from now (NotOwner: callers go to the new owner), stop
        reading and firing, let every batch already submitted commit, drop the groups and their users from
        memory, and read the remaining groups again. Idempotent. What it took."""
        async with self._moves:
            t = time.perf_counter()
            gone = set(groups) & self.core.groups
            if not gone:
                return {"shard": self.core.shard, "released": 0, "users": 0, "ms": 0.0}
            self._leaving |= gone
            try:
                await self._stop_readers()
                # Bounded: a batch that never settles must not hold the move (and this shard's readers) for ever;
                # the groups are then kept and the rescale goes on (the new owner's claim fences this shard).
                await asyncio.wait_for(self.batcher.barrier(), RELEASE_BARRIER_S)
                users = self.core.release(gone)
            finally:
                self._leaving -= gone
                self._restart_readers()
            ms = (time.perf_counter() - t) * 1000
            log.info("shard %d released %d key groups (%d users) in %.0f ms", self.core.shard, len(gone), users, ms)
            return {"shard": self.core.shard, "released": len(gone), "users": users, "ms": ms}

    async def acquire(self, groups: list[int]) -> dict[str, Any]:
        """Take these groups over: claim them with a higher epoch (fencing any older owner), then read their
        partitions and timers from their committed offsets; users load at their next event. Idempotent."""
        async with self._moves:
            t = time.perf_counter()
            if not set(groups) - self.core.groups:
                return {"shard": self.core.shard, "acquired": 0, "ms": 0.0}
            await self._stop_readers()
            try:
                claimed = self.core.acquire(groups)  # on the actor's thread, like the batches it must not overlap
            finally:
                self._restart_readers()
            ms = (time.perf_counter() - t) * 1000
            log.info("shard %d acquired %d key groups in %.0f ms", self.core.shard, len(claimed), ms)
            return {"shard": self.core.shard, "acquired": len(claimed), "ms": ms}

    async def groups(self) -> list[int]:
        return sorted(self.core.groups)

    async def _stop_readers(self) -> None:
        """Stop the partition reader and the timer firer; they wait for their chunks in flight."""
        if self._reader_stop is not None:
            self._reader_stop.set()
        for name, task in (("partition reader", self._reader_task), ("timer firer", self._firer_task)):
            if task is None:
                continue
            try:
                await asyncio.wait_for(task, 30)
            except Exception as e:  # noqa: BLE001 - a reader that died must not keep the move back
                log.warning("shard %d: the %s did not stop cleanly: %r", self.core.shard, name, e)
        self._reader_task = self._firer_task = None
        for client in (self.reader, self.firer):
            try:
                await client.close()
            except Exception as e:  # noqa: BLE001
                log.warning("shard %d: closing a Redis client: %r", self.core.shard, e)

    def _restart_readers(self) -> None:
        self.reader, self.firer = self._readers()
        self._reader_stop = asyncio.Event()
        if not self._exiting:
            self._start_readers()

    async def start(self) -> bool:
        """Start reading the input partitions (idempotent; health and process calls do it too)."""
        self._ensure_reader()
        return True

    async def health(self) -> dict[str, Any]:
        self._ensure_reader()
        h = self.core.health()
        moving = self._moves.locked()  # the reader and the firer are stopped for a moment
        running = moving or self._reader_task is not None and not self._reader_task.done()
        h["reader"] = {"running": running, "restarts": self.restarts["partition reader"],
                       "last_error": self.reader.last_error, **self.reader.stats}
        if not running:
            h["ok"] = False
            h["problems"].append("the partition reader is not running")
        firing = moving or self._firer_task is not None and not self._firer_task.done()
        late = sorted(self.firer.lateness_ms)
        h["timers"] = {"running": firing, "restarts": self.restarts["timer firer"], "last_error": self.firer.last_error,
                       **self.firer.stats,
                       "lateness_ms": {"p50": late[len(late) // 2], "p99": late[int(len(late) * 0.99)],
                                       "max": late[-1]} if late else None}
        if not firing:
            h["ok"] = False
            h["problems"].append("the timer firer is not running")
        h["queued"] = self.batcher.queued
        h["node"] = ray.get_runtime_context().get_node_id()  # the Ray node it runs on (spread, taken over)
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

    async def timer_lateness(self) -> list[float]:
        """Commit time minus due time (ms) of the timers fired lately (the last 100,000), for benchmarks."""
        return list(self.firer.lateness_ms)

    async def reset_stats(self) -> None:
        self.core.commit_ms.clear()
        self.firer.lateness_ms.clear()

    async def close(self) -> None:
        """Stop reading and firing (for good: nothing starts them again), let queued batches commit, give budget
        leases back."""
        self._exiting = True
        if self._reader_stop is not None:
            await self._stop_readers()
        await self.batcher.drain()
        self.core.close()


async def _idle(stop: asyncio.Event) -> None:
    await stop.wait()


UserActivityActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000)(  # type: ignore[call-overload]
    _UserActivityActor
)
