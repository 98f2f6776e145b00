"""Deliverer: actions from the key groups' outboxes to their targets, at least once, the same id every attempt.

The outbox itself (streams, retry schedules, attempt counts, dead letters) is the store's (store/outbox.py);
this is the loop around it: read what is due, attempt each delivery (webhooks over aiohttp), settle the outcomes.
Entries that are Redis writes and nothing else (actions of stream targets, and on a Redis Cluster the sends and
rejection records the commits put in the outbox, see store/commit.py) are forwarded as they are read, in outbox
order, never as concurrent attempts: after a failed forward, or at start, this consumer's pending ones are
forwarded first, so that what one group sent to another arrives in the order it was committed. A live deliverer
renews the leases of what it holds every `claim_idle_s / 3`, so however long its queue or its targets' timeouts,
nobody takes its entries while it lives; a dead one's entries are claimed by another after `claim_idle_s`.
Webhooks get the outbox bytes unchanged as body, with `Idempotency-Key: <action id>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from redis.exceptions import RedisClusterException, RedisError

from playbus.actors.service.errors import ServiceError
from playbus.actors.store.outbox import FORWARDED, GROUP, Found, Outbox, Settlement
from playbus.config.schema import TargetConfig

__all__ = ["GROUP", "RETRY_STATUSES", "DeliveryError", "Deliverer", "backoff_delay", "signature"]

_log = logging.getLogger(__name__)


class DeliveryError(ServiceError):
    """The deliverer was given settings it cannot work with."""


class _Stop(Protocol):
    def is_set(self) -> bool: ...


def backoff_delay(action_id: str, failures: int, base_s: float, max_s: float) -> float:
    """Seconds before the next try after `failures` failed ones: base*2^(failures-1) capped at max_s, times a
    jitter in [0.5, 1] taken from a hash of (action id, failures): spread out, yet the same on every run."""
    ceiling = min(max_s, base_s * 2.0 ** min(failures - 1, 62))
    h = hashlib.blake2b(f"{action_id}:{failures}".encode(), digest_size=8).digest()
    return ceiling * (0.5 + 0.5 * int.from_bytes(h, "big") / 2.0**64)


# Answers worth another try: a timeout, a conflict or lock an idempotent receiver reports while it is still
# working on the same key, too early, too many requests, and every 5xx.
RETRY_STATUSES = frozenset({408, 409, 423, 425, 429})


def signature(secret: str, body: bytes) -> str:
    """The X-Playbus-Signature value: "sha256=" + hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(slots=True)
class _Job:
    kg: int
    entry: str  # outbox entry id
    raw: bytes  # the action JSON as stored: the body of every attempt
    aid: str
    target: TargetConfig | None
    gameplay: str
    attempts: int  # failed attempts before this one
    first_ms: int = 0  # when the first attempt was made (0: this is the first)
    error: str = ""  # set when the entry cannot be delivered at all (dead-lettered at once)


@dataclass(slots=True)
class _Outcome:
    job: _Job
    status: str  # "ok" | "stream" | "retry" | "permanent"
    error: str = ""
    retry_after: float = 0.0
    started_ms: int = 0  # when this attempt started


class Deliverer:
    """Delivers the outbox entries of some key groups; any number of deliverers may share the groups.

    `key_groups` is a list of groups or, as an int n, all groups 0..n-1. Webhook calls run as asyncio tasks
    on one aiohttp session (hundreds in flight cost no threads), bounded per target so that one slow
    gameplay cannot take every slot; the Redis calls, a few per round and all pipelined, run in a worker
    thread so that the event loop keeps serving responses meanwhile.
    """

    def __init__(
        self,
        redis_client: Any,
        targets: Mapping[str, TargetConfig],
        key_groups: list[int] | int,
        consumer: str,
        base_backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        dead_stream: str = "playbus:dead",
        *,
        batch: int = 100,
        concurrency: int = 64,
        max_inflight: int = 1000,
        poll_s: float = 0.1,
        claim_idle_s: float | None = None,
    ) -> None:
        groups = list(range(key_groups)) if isinstance(key_groups, int) else sorted(set(key_groups))
        if not groups or min(groups) < 0:
            raise DeliveryError(f"key_groups must name at least one group >= 0, got {key_groups!r}")
        if not consumer:
            raise DeliveryError("consumer must be a non-empty name")
        if not 0 < base_backoff_s <= max_backoff_s:
            raise DeliveryError(f"need 0 < base_backoff_s <= max_backoff_s, got {base_backoff_s}, {max_backoff_s}")
        if batch < 1 or concurrency < 1 or max_inflight < 1 or poll_s <= 0:
            raise DeliveryError("batch, concurrency, max_inflight and poll_s must be positive")
        self.redis = redis_client
        self.targets = dict(targets)
        self.groups = groups
        self.consumer = consumer
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.dead_stream = dead_stream
        self.batch = batch
        self.concurrency = concurrency
        self.max_inflight = max_inflight
        self.poll_s = poll_s
        # Due retries are looked for every half backoff step (every outbox's retry set, one script call each):
        # no sooner is needed, since no retry is due sooner; and rarely when no target is a webhook.
        webhooks = any(getattr(t, "webhook", None) for t in self.targets.values())
        self.retry_scan_s = max(poll_s, base_backoff_s / 2) if webhooks else 5.0
        self.claim_idle_s = claim_idle_s if claim_idle_s is not None else 30.0
        if self.claim_idle_s <= 0:
            raise DeliveryError(f"claim_idle_s must be positive, got {claim_idle_s}")
        self.outbox = Outbox(redis_client, groups, consumer, dead_stream)
        self._stream_targets = {g: t.stream for g, t in self.targets.items() if t.stream and not t.webhook}
        self._stats = {"delivered": 0, "retried": 0, "dead": 0, "claimed": 0}
        self.forwarded = 0  # sends and rejection records forwarded (Redis Cluster), not counted in stats()
        self.by_target: dict[str, dict[str, int]] = {}  # gameplay -> delivered / retried / dead
        self._stop = threading.Event()
        self._recovered = False  # this consumer's own pending entries are read once, on the first poll
        self._held: set[tuple[int, str]] = set()  # (kg, entry) read and not yet settled: leases to renew
        self._next_renew = 0.0
        self._next_retry_scan = 0.0  # monotonic times
        self._next_claim_scan = time.monotonic() + self.claim_idle_s / 2
        self._sems: dict[str, asyncio.Semaphore] = {}
        self.outbox.ensure_groups()

    # -- public ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counts since start: delivered, retried (failed attempts to try again), dead, claimed."""
        return dict(self._stats)

    def stop(self) -> None:
        """Ask run()/run_forever() to stop: no new reads; in-flight attempts finish and are settled."""
        self._stop.set()

    def run_once(self) -> dict[str, int]:
        """One poll (new entries, due retries, idle claims), their deliveries, their settling; the counts of
        this round. For tests and tools; not to be called from inside a running event loop."""
        return asyncio.run(self.arun_once())

    async def arun_once(self) -> dict[str, int]:
        before = self.stats()
        async with self._session() as http:
            jobs = await asyncio.to_thread(self._poll, None, True, True)
            attempts = asyncio.gather(*(self._attempt(http, j) for j in jobs))
            while not (await asyncio.wait({attempts}, timeout=self.claim_idle_s / 3))[0]:
                await asyncio.to_thread(self._renew)  # slow targets: keep our entries from being claimed
            await asyncio.to_thread(self._settle, attempts.result())
        return {k: v - before[k] for k, v in self._stats.items()}

    def run_forever(self) -> None:
        """Deliver until stop() is called (from any thread)."""
        asyncio.run(self.run())

    async def run(self, stop_event: _Stop | None = None) -> None:
        """Deliver until `stop_event` (an asyncio or threading Event) or stop(); then drain and settle.
        Cancelling the task is a crash: whatever is in flight stays pending, for a later claim."""
        stop = stop_event if stop_event is not None else self._stop
        tasks: set[asyncio.Task[_Outcome]] = set()
        self._recovered = False
        self._next_renew = time.monotonic() + self.claim_idle_s / 3
        async with self._session() as http:
            try:
                while not (stop.is_set() or self._stop.is_set()):
                    try:
                        await self._step(http, tasks)
                    except (RedisError, RedisClusterException) as e:
                        _log.warning("delivery %s: Redis error, retrying: %s", self.consumer, e)
                        await asyncio.sleep(self.poll_s)
                if tasks:
                    done, _ = await asyncio.wait(tasks)
                    tasks.clear()
                    await asyncio.to_thread(self._settle, [t.result() for t in done])
            finally:
                for t in tasks:
                    t.cancel()
                self._held.clear()

    # -- the loop ----------------------------------------------------------------------------------
    async def _step(self, http: aiohttp.ClientSession, tasks: set[asyncio.Task[_Outcome]]) -> None:
        now = time.monotonic()
        if self._held and now >= self._next_renew:
            await asyncio.to_thread(self._renew)
        jobs: list[_Job] = []
        if not tasks or self.max_inflight - len(tasks) >= max(1, self.max_inflight // 4):
            block = None if tasks else self._block_ms(now)
            jobs = await asyncio.to_thread(
                self._poll, block, now >= self._next_retry_scan, now >= self._next_claim_scan
            )
            tasks.update(asyncio.create_task(self._attempt(http, j)) for j in jobs)
        if tasks:
            wait = 0.0 if jobs else max(0.001, min(self.poll_s, self._next_retry_scan - time.monotonic()))
            done, _ = await asyncio.wait(tasks, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if done:
                tasks.difference_update(done)
                await asyncio.to_thread(self._settle, [t.result() for t in done])

    def _block_ms(self, now: float) -> int | None:
        ms = int((min(self._next_retry_scan, self._next_claim_scan, now + self.poll_s) - now) * 1000)
        return ms if ms >= 1 else None  # None: do not block (BLOCK 0 would block forever)

    # -- Redis side (worker thread) ----------------------------------------------------------------
    def _renew(self) -> None:
        """Renew the leases of every held entry (see Outbox.renew)."""
        self.outbox.renew(self._held, int(time.time() * 1000) + int(self.claim_idle_s * 1000))
        self._next_renew = time.monotonic() + self.claim_idle_s / 3

    def _poll(self, block_ms: int | None, retries: bool, claims: bool) -> list[_Job]:
        """Due retries, claimed idle entries, then new entries (one XREADGROUP over every outbox). What is only to
        forward is forwarded here, in the order read; the rest are the jobs to attempt."""
        jobs: list[_Job] = []
        forwards: list[Found] = []
        own = not self._recovered
        if own and self.outbox.cluster:
            forwards += self.outbox.pending_forwards()
        if retries or claims or own:
            now = time.monotonic()
            wall_ms = int(time.time() * 1000)
            found = self.outbox.scan(
                due_ms=wall_ms if retries else None, lease_until_ms=wall_ms + int(self.claim_idle_s * 1000),
                claim=("own" if own else "idle") if claims or own else None,
                claim_idle_ms=int(self.claim_idle_s * 1000), count=self.batch)
            fresh = [f for f in found if (f.kg, f.entry) not in self._held]
            self._stats["claimed"] += sum(1 for f in fresh if f.claimed)
            self._sort(fresh, jobs, forwards)
            self._recovered = True
            if retries:
                self._next_retry_scan = now + self.retry_scan_s
            if claims:
                self._next_claim_scan = now + self.claim_idle_s / 2
        new = self.outbox.read_new(self.batch, None if jobs or forwards else block_ms)
        self._sort(new, jobs, forwards)
        if forwards:
            self._forward(forwards)
        self._held.update((j.kg, j.entry) for j in jobs)
        return jobs

    def _sort(self, found: Iterable[Found], jobs: list[_Job], forwards: list[Found]) -> None:
        """Entries to attempt (webhook actions, and whatever cannot be read: dead-lettered by its attempt) into
        `jobs`; entries that are Redis writes into `forwards`."""
        for f in found:
            if f.kind in FORWARDED:
                forwards.append(f)
                continue
            job = self._job(f.kg, f.entry, f.raw, f.attempts, f.first_ms)
            if not job.error and job.gameplay in self._stream_targets:
                forwards.append(f)
            else:
                jobs.append(job)

    def _forward(self, forwards: list[Found]) -> None:
        """Forward in the order read (each entry once, though a recovery may have read it twice). On a failure the
        entries stay pending and this consumer's pending forwards are read again first at the next poll."""
        seen: set[tuple[int, str]] = set()
        todo = []
        for f in forwards:
            if (f.kg, f.entry) not in seen:
                seen.add((f.kg, f.entry))
                todo.append(f)
        try:
            self.outbox.forward(todo, self._stream_targets)
        except Exception:
            self._recovered = False
            raise
        for f in todo:
            if f.kind in FORWARDED:
                self.forwarded += 1
            else:
                gameplay = self._job(f.kg, f.entry, f.raw, 0).gameplay
                counts = self.by_target.setdefault(gameplay, {"delivered": 0, "retried": 0, "dead": 0})
                counts["delivered"] += 1
                self._stats["delivered"] += 1

    def _job(self, kg: int, entry_id: str, body: bytes, attempts: int, first_ms: int = 0) -> _Job:
        try:
            action = json.loads(body)
            aid, gameplay = action["id"], action["type"].split(".", 1)[0]
            if not isinstance(aid, str):
                raise TypeError("id")
        except (ValueError, KeyError, TypeError, AttributeError):
            return _Job(kg, entry_id, body, entry_id, None, "", attempts, first_ms,
                        "outbox entry is not an action JSON with string 'id' and 'type'")
        target = self.targets.get(gameplay)
        if target is None:
            return _Job(kg, entry_id, body, aid, None, gameplay, attempts, first_ms,
                        f"no target configured for gameplay {gameplay!r}")
        return _Job(kg, entry_id, body, aid, target, gameplay, attempts, first_ms)

    def _settle(self, outcomes: Iterable[_Outcome]) -> None:
        """Record what the attempts gave (Outbox.settle, one pipeline). Held no more either way: if Redis fails
        here, the entries' leases lapse and they are claimed again."""
        outcomes = list(outcomes)
        for o in outcomes:
            self._held.discard((o.job.kg, o.job.entry))
        s = Settlement()
        wall_ms = int(time.time() * 1000)
        now = time.monotonic()
        for o in outcomes:
            j = o.job
            counts = self.by_target.setdefault(j.gameplay, {"delivered": 0, "retried": 0, "dead": 0})
            if o.status in ("ok", "stream"):
                if o.status == "stream" and j.target is not None and j.target.stream:
                    s.to_streams.append((j.target.stream, j.raw))
                counts["delivered"] += 1
                s.delivered.append((j.kg, j.entry, j.aid))
                continue
            failures = j.attempts + 1
            first_ms = j.first_ms or o.started_ms or wall_ms
            if o.status == "permanent" or self._given_up(j.target, failures, first_ms, wall_ms):
                s.dead.append((j.kg, j.entry, j.aid, j.raw, o.error, failures))
                counts["dead"] += 1
            else:
                delay = max(backoff_delay(j.aid, failures, self.base_backoff_s, self.max_backoff_s),
                            min(o.retry_after, self.max_backoff_s))
                s.later.append((j.kg, j.entry, j.aid, failures, first_ms, wall_ms + int(delay * 1000)))
                self._next_retry_scan = min(self._next_retry_scan, now + delay)
                counts["retried"] += 1
        self.outbox.settle(s)
        self._stats["delivered"] += len(s.delivered)
        self._stats["dead"] += len(s.dead)
        self._stats["retried"] += len(s.later)

    @staticmethod
    def _given_up(target: TargetConfig | None, failures: int, first_ms: int, now_ms: int) -> bool:
        """Dead-letter after `max_attempts` attempts (when set), or once `retry_for` has passed since the first."""
        if target is None:
            return True
        if target.max_attempts is not None and failures >= target.max_attempts:
            return True
        return now_ms - first_ms >= target.retry_for_s * 1000

    # -- HTTP side (event loop) --------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[aiohttp.ClientSession]:
        self._sems = {}  # semaphores belong to one event loop: fresh ones per session
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            yield http

    async def _attempt(self, http: aiohttp.ClientSession, job: _Job) -> _Outcome:
        if job.error:
            return _Outcome(job, "permanent", job.error)
        t = job.target
        assert t is not None
        if t.webhook is None:
            return _Outcome(job, "stream")
        sem = self._sems.get(job.gameplay)
        if sem is None:
            sem = self._sems[job.gameplay] = asyncio.Semaphore(self.concurrency)
        headers = {**t.headers, "Idempotency-Key": job.aid, "Content-Type": "application/json"}
        if t.secret:
            headers["X-Playbus-Signature"] = signature(t.secret, job.raw)
        async with sem:  # the timeout starts inside: waiting for a slot is not the target's fault
            started = int(time.time() * 1000)
            try:
                async with http.post(t.webhook, data=job.raw, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=t.timeout_s)) as resp:
                    status = resp.status
                    body = await resp.read()
                    retry_after = resp.headers.get("Retry-After", "")
            except asyncio.TimeoutError:
                return _Outcome(job, "retry", f"timeout after {t.timeout_s:g} s", started_ms=started)
            except Exception as e:  # connection refused/reset, bad URL, ...: all worth another try
                return _Outcome(job, "retry", f"{type(e).__name__}: {e}"[:300], started_ms=started)
        if 200 <= status < 300:
            return _Outcome(job, "ok")
        error = f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
        if 400 <= status < 500 and status not in RETRY_STATUSES:
            return _Outcome(job, "permanent", error, started_ms=started)
        wait = float(retry_after) if retry_after.strip().replace(".", "", 1).isdigit() else 0.0
        return _Outcome(job, "retry", error, wait, started_ms=started)
