"""Deliverer: actions from the key groups' outboxes to their targets, at least once, the same id every attempt.

Keys (a key group's hash tag keeps its keys in one Redis Cluster slot):
    playbus:{kg17}:outbox    stream  field "action" = action JSON (the shards' commits add it); consumer group
                                     "delivery"; an entry stays pending until it is settled
    playbus:{kg17}:attempts  hash    action id -> failed attempts so far
    playbus:{kg17}:retry     zset    outbox entry id -> when (ms since epoch) to try it again
    playbus:dead             stream  fields action, error, attempts, kg, entry: the actions given up
Settling writes the target stream / dead-letter entry first and XACK+XDEL last, so a crash at any point leaves
the entry pending: redelivered later (XAUTOCLAIM after `claim_idle_s`), never acked without being delivered.
A due retry is leased (re-scored `claim_idle_s` ahead) while it is tried, so a deliverer dying mid-retry only
delays it. A live deliverer renews both leases of what it holds (XCLAIM JUSTID resets the pending entry's
idle time, ZADD XX pushes the retry score) every `claim_idle_s / 3`, so however long its queue or its
targets' timeouts, nobody takes its entries while it lives. Webhooks get the outbox bytes unchanged as body,
with `Idempotency-Key: <action id>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from redis.exceptions import RedisError, ResponseError

from playbus.actors.engine.errors import EngineError
from playbus.actors.engine.keys import group_prefix
from playbus.config.schema import TargetConfig

__all__ = ["GROUP", "DeliveryError", "Deliverer", "backoff_delay"]

GROUP = "delivery"
_log = logging.getLogger(__name__)

# KEYS: retry zset, outbox, attempts. ARGV: now ms, lease-until ms, limit.
# Due entries are re-scored to the lease end (not removed): a deliverer dying mid-try only delays them.
# Returns {entry id, action or "", failed attempts}; entries gone from the outbox are dropped from the zset.
_TAKE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(due) do
  local e = redis.call('XRANGE', KEYS[2], id, id)
  if #e == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    out[#out + 1] = _entry(e[1], KEYS[3])
  end
end
return out
"""
# KEYS: outbox, retry zset, attempts. ARGV: group, consumer, "own"|"idle", min idle ms, count.
# "own": this consumer's pending entries (a restart under the same name); "idle": XAUTOCLAIM from anyone.
# Entries waiting in the retry zset are skipped: their retry is due later, through _TAKE_DUE.
_CLAIM = """
local found
if ARGV[3] == 'own' then
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[5], 'STREAMS', KEYS[1], '0')
  found = (r and r[1] and r[1][2]) or {}
else
  found = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], '0-0', 'COUNT', ARGV[5])[2]
end
local out = {}
for _, e in ipairs(found) do
  if type(e[2]) == 'table' and not redis.call('ZSCORE', KEYS[2], e[1]) then
    out[#out + 1] = _entry(e, KEYS[3])
  end
end
return out
"""
_ENTRY_FN = """
local function _entry(e, attempts_key)
  local f, action = e[2], ''
  for i = 1, #f, 2 do if f[i] == 'action' then action = f[i + 1] end end
  local ok, obj = pcall(cjson.decode, action)
  local n = 0
  if ok and type(obj) == 'table' and type(obj.id) == 'string' then
    n = tonumber(redis.call('HGET', attempts_key, obj.id)) or 0
  end
  return {e[1], action, n}
end
"""


class DeliveryError(EngineError):
    """The deliverer was given settings it cannot work with."""


class _Stop(Protocol):
    def is_set(self) -> bool: ...


def backoff_delay(action_id: str, failures: int, base_s: float, max_s: float) -> float:
    """Seconds before the next try after `failures` failed ones: base*2^(failures-1) capped at max_s, times a
    jitter in [0.5, 1] taken from a hash of (action id, failures): spread out, yet the same on every run."""
    ceiling = min(max_s, base_s * 2.0 ** min(failures - 1, 62))
    h = hashlib.blake2b(f"{action_id}:{failures}".encode(), digest_size=8).digest()
    return ceiling * (0.5 + 0.5 * int.from_bytes(h, "big") / 2.0**64)


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


@dataclass(slots=True)
class _Job:
    kg: int
    entry: str  # outbox entry id
    raw: bytes  # the action JSON as stored: the body of every attempt
    aid: str
    target: TargetConfig | None
    gameplay: str
    attempts: int  # failed attempts before this one
    error: str = ""  # set when the entry cannot be delivered at all (dead-lettered at once)


@dataclass(slots=True)
class _Outcome:
    job: _Job
    status: str  # "ok" | "stream" | "retry" | "permanent"
    error: str = ""
    retry_after: float = 0.0


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
        base_backoff_s: float = 0.2,
        max_backoff_s: float = 30.0,
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
        self.claim_idle_s = claim_idle_s if claim_idle_s is not None else 30.0
        if self.claim_idle_s <= 0:
            raise DeliveryError(f"claim_idle_s must be positive, got {claim_idle_s}")
        self._keys = {kg: group_prefix(kg) for kg in groups}
        self._outbox_kg = {group_prefix(kg) + "outbox": kg for kg in groups}
        self._streams = {k: ">" for k in self._outbox_kg}
        self._take_due = redis_client.register_script(_ENTRY_FN + _TAKE_DUE)
        self._claim = redis_client.register_script(_ENTRY_FN + _CLAIM)
        self._stats = {"delivered": 0, "retried": 0, "dead": 0, "claimed": 0}
        self._stop = threading.Event()
        self._recovered = False  # this consumer's own pending entries are read once, on the first poll
        self._held: set[tuple[int, str]] = set()  # (kg, entry) read and not yet settled: leases to renew
        self._next_renew = 0.0
        self._next_retry_scan = 0.0  # monotonic times
        self._next_claim_scan = time.monotonic() + self.claim_idle_s / 2
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._ensure_groups()

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
                    except RedisError as e:
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
    def _ensure_groups(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for key in self._outbox_kg:
            pipe.xgroup_create(key, GROUP, id="0", mkstream=True)
        for r in pipe.execute(raise_on_error=False):
            if isinstance(r, Exception) and "BUSYGROUP" not in str(r):
                raise r

    def _renew(self) -> None:
        """Renew the leases of every held entry: pending idle time back to 0, retry score pushed ahead."""
        by_kg: dict[int, list[str]] = {}
        for kg, entry in self._held:
            by_kg.setdefault(kg, []).append(entry)
        lease = int(time.time() * 1000) + int(self.claim_idle_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for kg, ids in by_kg.items():
            p = self._keys[kg]
            pipe.xclaim(p + "outbox", GROUP, self.consumer, 0, ids, justid=True)
            pipe.zadd(p + "retry", dict.fromkeys(ids, lease), xx=True)
        pipe.execute()
        self._next_renew = time.monotonic() + self.claim_idle_s / 3

    def _poll(self, block_ms: int | None, retries: bool, claims: bool) -> list[_Job]:
        """Due retries, claimed idle entries, then new entries (one XREADGROUP over every outbox)."""
        jobs: list[_Job] = []
        own = not self._recovered
        if retries or claims or own:
            now = time.monotonic()
            wall_ms = int(time.time() * 1000)
            pipe = self.redis.pipeline(transaction=False)
            calls: list[tuple[int, bool]] = []
            for kg in self.groups:
                p = self._keys[kg]
                if retries:
                    lease = wall_ms + int(self.claim_idle_s * 1000)
                    self._take_due(keys=[p + "retry", p + "outbox", p + "attempts"],
                                   args=[wall_ms, lease, self.batch], client=pipe)
                    calls.append((kg, False))
                if claims or own:
                    mode = "own" if own else "idle"
                    self._claim(keys=[p + "outbox", p + "retry", p + "attempts"],
                                args=[GROUP, self.consumer, mode, int(self.claim_idle_s * 1000), self.batch],
                                client=pipe)
                    calls.append((kg, True))
            for (kg, claimed), found in zip(calls, pipe.execute(), strict=True):
                fresh = [(e, raw, n) for e, raw, n in found if (kg, _text(e)) not in self._held]
                jobs.extend(self._job(kg, e, raw, int(n)) for e, raw, n in fresh)
                if claimed:
                    self._stats["claimed"] += len(fresh)
            self._recovered = True
            if retries:
                self._next_retry_scan = now + self.poll_s
            if claims:
                self._next_claim_scan = now + self.claim_idle_s / 2
        try:
            got = self.redis.xreadgroup(GROUP, self.consumer, self._streams, count=self.batch,
                                        block=None if jobs else block_ms)
        except ResponseError as e:
            if "NOGROUP" not in str(e) and "UNBLOCKED" not in str(e):
                raise
            self._ensure_groups()  # an outbox (or its group) was deleted: recreate, read next time
            got = None
        resp3 = isinstance(got, dict)  # RESP3: {key: [[entries]]}; RESP2: [[key, [entries]], ...]
        for key, entries in (got.items() if resp3 else got or ()):
            kg = self._outbox_kg[_text(key)]
            for entry, fields in (entries[0] if resp3 and entries else entries):
                raw = (fields or {}).get(b"action") or (fields or {}).get("action") or b""
                jobs.append(self._job(kg, entry, raw, 0))
        self._held.update((j.kg, j.entry) for j in jobs)
        return jobs

    def _job(self, kg: int, entry: bytes | str, raw: bytes | str, attempts: int) -> _Job:
        body = raw.encode() if isinstance(raw, str) else raw
        entry_id = _text(entry)
        try:
            action = json.loads(body)
            aid, gameplay = action["id"], action["type"].split(".", 1)[0]
            if not isinstance(aid, str):
                raise TypeError("id")
        except (ValueError, KeyError, TypeError, AttributeError):
            return _Job(kg, entry_id, body, entry_id, None, "", attempts,
                        "outbox entry is not an action JSON with string 'id' and 'type'")
        target = self.targets.get(gameplay)
        if target is None:
            return _Job(kg, entry_id, body, aid, None, gameplay, attempts,
                        f"no target configured for gameplay {gameplay!r}")
        return _Job(kg, entry_id, body, aid, target, gameplay, attempts)

    def _settle(self, outcomes: Iterable[_Outcome]) -> None:
        """Record what the attempts gave, in one pipeline: target/dead XADDs first, acks last. Held no
        more either way: if Redis fails here, the entries' leases lapse and they are claimed again."""
        outcomes = list(outcomes)
        for o in outcomes:
            self._held.discard((o.job.kg, o.job.entry))
        pipe = self.redis.pipeline(transaction=False)
        wall_ms = int(time.time() * 1000)
        now = time.monotonic()
        done: dict[int, list[_Job]] = {}
        later: list[tuple[_Job, int, float]] = []
        counts = {"delivered": 0, "retried": 0, "dead": 0}
        for o in outcomes:
            j = o.job
            if o.status in ("ok", "stream"):
                if o.status == "stream" and j.target is not None and j.target.stream:
                    pipe.xadd(j.target.stream, {"action": j.raw})
                counts["delivered"] += 1
                done.setdefault(j.kg, []).append(j)
                continue
            failures = j.attempts + 1
            limit = j.target.max_attempts if j.target is not None else 1
            if o.status == "permanent" or failures >= limit:
                pipe.xadd(self.dead_stream, {"action": j.raw, "error": o.error, "attempts": failures,
                                             "kg": j.kg, "entry": j.entry, "consumer": self.consumer})
                counts["dead"] += 1
                done.setdefault(j.kg, []).append(j)
            else:
                delay = backoff_delay(j.aid, failures, self.base_backoff_s, self.max_backoff_s)
                later.append((j, failures, max(delay, min(o.retry_after, self.max_backoff_s))))
                counts["retried"] += 1
        for j, failures, delay in later:
            p = self._keys[j.kg]
            pipe.hset(p + "attempts", j.aid, failures)
            pipe.zadd(p + "retry", {j.entry: wall_ms + int(delay * 1000)})
            self._next_retry_scan = min(self._next_retry_scan, now + delay)
        for kg, jobs in done.items():
            p = self._keys[kg]
            ids = [j.entry for j in jobs]
            pipe.zrem(p + "retry", *ids)
            pipe.hdel(p + "attempts", *{j.aid for j in jobs})
            pipe.xack(p + "outbox", GROUP, *ids)
            pipe.xdel(p + "outbox", *ids)
        if len(pipe):
            pipe.execute()
        for k, v in counts.items():
            self._stats[k] += v

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
        headers = {"Idempotency-Key": job.aid, "Content-Type": "application/json"}
        async with sem:  # the timeout starts inside: waiting for a slot is not the target's fault
            try:
                async with http.post(t.webhook, data=job.raw, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=t.timeout_s)) as resp:
                    status = resp.status
                    body = await resp.read()
                    retry_after = resp.headers.get("Retry-After", "")
            except asyncio.TimeoutError:
                return _Outcome(job, "retry", f"timeout after {t.timeout_s:g} s")
            except Exception as e:  # connection refused/reset, bad URL, ...: all worth another try
                return _Outcome(job, "retry", f"{type(e).__name__}: {e}"[:300])
        if 200 <= status < 300:
            return _Outcome(job, "ok")
        error = f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
        if 400 <= status < 500 and status not in (408, 429):
            return _Outcome(job, "permanent", error)
        wait = float(retry_after) if retry_after.strip().replace(".", "", 1).isdigit() else 0.0
        return _Outcome(job, "retry", error, wait)
