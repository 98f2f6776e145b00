"""Cluster benchmark: every input path of a running playbus, each beside the baseline, in one run.

    python -m playbus.loadtest.bench_cluster [--quick] [--users N] [--rounds N] [--json FILE]

It starts the whole system in this process as run_cluster does (Ray, 2 shards reading their partitions, the
input router, delivery, the Serve ingress, an embedded redis-server with AOF), with one campaign whose rule is
"the first quiz answer of a user grants a lottery chance" (an action on a Redis stream target).

The baseline is what a team would otherwise write: the same decision as a Redis Lua script, EVALSHA per event,
pipelined 1,000 per round trip, from this process, against the same Redis (dedup set, counter, action stream).
This machine's speed drifts by tens of percent within a minute, so every measurement is a few rounds, each a
baseline run right before a path run, and a path's ratio is the median of its rounds' ratios.

Paths (events/s from the first event sent to the last one committed, with its action on the target stream):
  shards      driver -> UserActivityActor.process (Ray calls, batches of B events, 4 in flight per shard)
  stream      StreamProducer: record batches of B events into the input partitions, read by their shards
  stream-in   XADD playbus:in, one event an entry (what a simple producer does), routed into the partitions
  http        POST /v1/events through Ray Serve, B events a request (msgpack), 4 clients
  http-1      one event a request at a fixed rate (open loop): latency percentiles
  serve-noop  requests the ingress answers without a shard (Serve's own cost per request on this machine), on
              the direct road and, in a second cluster, through Serve's proxy (run_cluster --serve-proxy)
  actor-call  a second baseline: one Ray actor call per event (a no-op method)
with the CPU each process group spends per event (cpu.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgpack

from playbus.loadtest import bench_linkage, bench_ops, bench_scaling
from playbus.loadtest.bench_engine import FIRST_QUIZ, T0, TEN_KEYS  # T0: 2026-01-21, in the campaign
from playbus.loadtest.cpu import CpuMeter
from playbus.loadtest.stats import percentile

__all__ = ["BENCH_CONFIG", "ClusterBench", "PathResult", "main"]

BENCH_CONFIG = """
shards: {shards}
key_groups: 128
batch: {{max_events: 2000, max_wait_ms: 2}}
targets:
  lottery: {{stream: "playbus:actions:lottery"}}
campaigns:
  - id: spring2026
    timezone: Asia/Shanghai
    starts: 2026-01-20T00:00:00+08:00
    ends: 2028-01-01T00:00:00+08:00   # timers fire at wall-clock time: their events must be inside it
    rules:
      - {{id: first_quiz_lottery, on: quiz.answered, script: first_quiz_lottery.lua, emits: [lottery.grant_chance]}}
      - {{id: ten_keys, on: bench.fill, script: ten_keys.lua}}
      # bench_linkage: a send and a timer, whose events run the same rule as quiz.answered
      - {{id: relay, on: assist.helped, script: relay.lua, sends: [assist.credited]}}
      - {{id: credited, on: assist.credited, script: first_quiz_lottery.lua, emits: [lottery.grant_chance]}}
      - {{id: arm, on: timer.arm, script: arm.lua, sends: [timer.fire]}}
      - {{id: fired, on: timer.fire, script: first_quiz_lottery.lua, emits: [lottery.grant_chance]}}
"""
# The memory measurement: one event a user gives its context 10 keys (TEN_KEYS).
# The baseline: dedup by id, count, emit on the first answer; EVALSHA per event.
REDIS_DECISION = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[2], 'quiz.answered', 1)
if n == 1 then redis.call('XADD', KEYS[3], '*', 'action', ARGV[2]) end
return 1
"""


@dataclass
class PathResult:
    """One path at one parameter (batch size, events per request): its rounds and what they add up to."""

    path: str
    param: int
    events_per_s: float  # median over rounds
    baseline_events_per_s: float  # median of the baseline runs right before each round
    ratio: float  # median of the rounds' path / baseline
    rounds: list[dict[str, float]] = field(default_factory=list)
    cpu_us_per_event: dict[str, float] = field(default_factory=dict)
    baseline_cpu_us_per_event: dict[str, float] = field(default_factory=dict)  # driver and redis-server
    latency_ms: dict[str, float] = field(default_factory=dict)


def events(n: int, users: int, prefix: str) -> list[dict[str, Any]]:
    """n quiz answers of `users` users, ids unique by `prefix`."""
    return [{"id": f"{prefix}{i}", "campaign": "spring2026", "user": f"u{i % users}", "type": "quiz.answered",
             "ts": T0 + i, "data": {"correct": i % 3 == 0}} for i in range(n)]


class _Echo:
    def call(self, x: bytes) -> bytes:
        return x


class ClusterBench:
    """A whole playbus started in this process, and the paths and baselines measured against it."""

    def __init__(self, workdir: Path, shards: int = 2, users: int = 10_000, rounds: int = 3,
                 progress: Callable[[str], None] = print, serve_proxy: bool = False, warm: bool = True) -> None:
        self.workdir = workdir
        self.serve_proxy = serve_proxy  # HTTP through Serve's proxy actor (run_cluster --serve-proxy)
        self.warm = warm
        self.shards_n = shards
        self.users = users
        self.rounds = rounds
        self.say = progress
        self._seq = 0
        self.cluster: Any = None

    # -- set-up ------------------------------------------------------------------------------------
    def __enter__(self) -> ClusterBench:
        from playbus.actors.edge.cluster import Cluster
        from playbus.actors.store.server import free_port

        (self.workdir / "first_quiz_lottery.lua").write_text(FIRST_QUIZ)
        (self.workdir / "ten_keys.lua").write_text(TEN_KEYS)
        (self.workdir / "relay.lua").write_text(bench_linkage.RELAY)
        (self.workdir / "arm.lua").write_text(bench_linkage.ARM)
        config = self.workdir / "bench.yaml"
        config.write_text(BENCH_CONFIG.format(shards=self.shards_n))
        self.port = free_port()
        args = argparse.Namespace(config=str(config), port=self.port, host="127.0.0.1", redis=None,
                                  redis_dir=str(self.workdir / "redis"), address=None, shards=None,
                                  log_level="WARNING", serve_proxy=self.serve_proxy)
        self.cluster = Cluster(args)
        self.url = self.cluster.start()
        import redis

        self.redis_url = self.cluster.redis_server.url
        self.r = redis.Redis.from_url(self.redis_url)
        self.shards = self.cluster.shards
        self.meter = CpuMeter([self.cluster.redis_server.proc.pid])
        self._lua = self.r.register_script(REDIS_DECISION)
        self._lua(keys=["b:seen:x", "b:ctx:x", "b:out"], args=["warm", "{}"])
        if not self.warm:
            return self
        self.say(f"warming up: {self.users:,} users through every path")
        self.run_shards(events(self.users, self.users, "warm-s"), 500)
        self.run_stream(events(self.users, self.users, "warm-p"), 500)
        self._http(events(2000, self.users, "warm-h"), 500, 2)
        self.baseline(5000)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cluster is not None:
            self.cluster.stop()

    def _prefix(self, tag: str) -> str:
        self._seq += 1
        return f"{tag}{self._seq}-"

    def committed(self) -> int:
        import ray

        return sum(s["events"] for s in ray.get([x.stats.remote() for x in self.shards]))

    def _wait_committed(self, target: int, timeout_s: float = 300) -> None:
        end = time.monotonic() + timeout_s
        while self.committed() < target:
            if time.monotonic() > end:
                raise TimeoutError(f"events not committed after {timeout_s:.0f} s")
            time.sleep(0.005)

    # -- the baselines -----------------------------------------------------------------------------
    def baseline(self, n: int) -> float:
        """The Redis Lua decision, EVALSHA per event, pipelined 1,000 per round trip: events/s."""
        sha = self._lua.sha
        action = json.dumps({"type": "lottery.grant_chance", "params": {"chances": 1}})
        prefix = self._prefix("b")
        users = self.users
        t = time.perf_counter()
        for start in range(0, n, 1000):
            pipe = self.r.pipeline(transaction=False)
            for i in range(start, min(n, start + 1000)):
                u = f"u{i % users}"
                pipe.evalsha(sha, 3, f"b:seen:{u}", f"b:ctx:{u}", "b:out", f"{prefix}{i}", action)
            pipe.execute()
        return n / (time.perf_counter() - t)

    def actor_per_event(self, n: int) -> float:
        """One Ray actor call per event (a no-op method, two actors, all calls in flight): events/s."""
        import ray

        echo: Any = ray.remote(num_cpus=0)(_Echo)
        actors = [echo.remote(), echo.remote()]
        ray.get([a.call.remote(b"") for a in actors])
        payload = msgpack.packb(events(1, 1, "x")[0])
        t = time.perf_counter()
        ray.get([actors[i % 2].call.remote(payload) for i in range(n)])
        eps = n / (time.perf_counter() - t)
        for a in actors:
            ray.kill(a)
        return eps

    # -- the paths ---------------------------------------------------------------------------------
    def run_shards(self, evs: list[dict[str, Any]], batch: int, inflight: int = 4) -> tuple[float, list[float]]:
        """Driver -> shards: batches of `batch` events, routed by key group, `inflight` per shard."""
        from playbus.actors.service.router import Router

        router = Router(self.shards_n, 128)
        sem = asyncio.Semaphore(inflight * self.shards_n)
        lat: list[float] = []
        shards = self.shards

        async def one(chunk: list[dict[str, Any]]) -> None:
            async with sem:
                t = time.perf_counter()
                parts = router.split(chunk)
                replies = await asyncio.gather(*(shards[s].process.remote(msgpack.packb(es))
                                                 for s, (_, es) in parts.items()))
                for r in replies:
                    if not all(x["status"] == "applied" for x in msgpack.unpackb(r, raw=False)):
                        raise AssertionError("an event of the benchmark was not applied")
                lat.append((time.perf_counter() - t) * 1000)

        async def drive() -> float:
            t = time.perf_counter()
            await asyncio.gather(*(one(evs[i:i + batch]) for i in range(0, len(evs), batch)))
            return len(evs) / (time.perf_counter() - t)

        return asyncio.run(drive()), lat

    def run_stream(self, evs: list[dict[str, Any]], batch: int) -> float:
        """StreamProducer record batches of `batch` events into the partitions; added -> committed."""
        from playbus.client import StreamProducer

        producer = StreamProducer(self.r, key_groups=128, batch=batch)
        target = self.committed() + len(evs)
        t = time.perf_counter()
        producer.send_many(evs)
        self._wait_committed(target)
        return len(evs) / (time.perf_counter() - t)

    def run_stream_in(self, evs: list[dict[str, Any]]) -> float:
        """XADD playbus:in, one msgpack event an entry, pipelined 1,000 per round trip; added -> committed."""
        target = self.committed() + len(evs)
        t = time.perf_counter()
        for start in range(0, len(evs), 1000):
            pipe = self.r.pipeline(transaction=False)
            for e in evs[start:start + 1000]:
                pipe.xadd("playbus:in", {"event": msgpack.packb(e)})
            pipe.execute()
        self._wait_committed(target)
        return len(evs) / (time.perf_counter() - t)

    def _post_all(self, path: str, bodies: list[bytes], clients: int, expect: int,
                  content_type: str = "application/msgpack") -> tuple[float, list[float]]:
        """POST every body to `path` from `clients` closed-loop clients (each sends its next body once answered;
        any other status than `expect` fails the run): (seconds, latencies in ms)."""
        import aiohttp

        lat: list[float] = []
        url = self.url + path
        headers = {"content-type": content_type}

        async def client(session: aiohttp.ClientSession, queue: list[bytes]) -> None:
            while queue:
                body = queue.pop()
                t = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != expect:
                        raise AssertionError(f"POST {path}: {resp.status}")
                lat.append((time.perf_counter() - t) * 1000)

        async def drive() -> float:
            queue = list(reversed(bodies))
            async with aiohttp.ClientSession() as session:
                t = time.perf_counter()
                await asyncio.gather(*(client(session, queue) for _ in range(clients)))
                return time.perf_counter() - t

        return asyncio.run(drive()), lat

    def _http(self, evs: list[dict[str, Any]], per_request: int, clients: int) -> tuple[float, list[float]]:
        """POST /v1/events, `per_request` events a request (msgpack): events/s and request latencies."""
        bodies = [msgpack.packb(evs[i:i + per_request]) for i in range(0, len(evs), per_request)]
        seconds, lat = self._post_all("/v1/events", bodies, clients, 200)
        return len(evs) / seconds, lat

    def http_single(self, rate: float, seconds: float) -> dict[str, float]:
        """One JSON event a request at `rate` requests/s for `seconds` (open loop: requests leave on schedule,
        whatever the answers): latency percentiles."""
        import aiohttp

        n = int(rate * seconds)
        evs = events(n, self.users, self._prefix("one"))
        bodies = [json.dumps(e).encode() for e in evs]
        lat: list[float] = []
        url = self.url + "/v1/events"

        async def one(session: aiohttp.ClientSession, body: bytes, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            t = time.perf_counter()
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                await resp.read()
                if resp.status != 200:
                    raise AssertionError(f"POST /v1/events: {resp.status}")
            lat.append((time.perf_counter() - t) * 1000)

        async def drive() -> None:
            async with aiohttp.ClientSession() as session:
                start = time.perf_counter() + 0.1
                await asyncio.gather(*(one(session, b, start + i / rate) for i, b in enumerate(bodies)))

        asyncio.run(drive())
        return {"requests": n, "rate": rate, "p50": percentile(lat, 0.5), "p90": percentile(lat, 0.9),
                "p99": percentile(lat, 0.99), "max": max(lat)}

    def serve_noop(self, requests: int, clients: int) -> dict[str, float]:
        """Serve's own cost per request: a request the ingress answers without a shard (an unknown path, 404),
        on the same road as the events (the ingress replica's own HTTP server, or Serve's proxy with
        --serve-proxy): requests/s and latency."""
        self._post_all("/v1/bench-noop", [b"{}"] * 200, clients, 404, "application/json")  # warm up
        seconds, lat = self._post_all("/v1/bench-noop", [b"{}"] * requests, clients, 404, "application/json")
        return {"requests_per_s": requests / seconds, "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)}

    # -- memory and recovery ---------------------------------------------------------------------------
    def shard_rss(self) -> int:
        """Resident memory of the shard processes, bytes."""
        import psutil
        import ray

        pids = [s["pid"] for s in ray.get([x.stats.remote() for x in self.shards])]
        return sum(psutil.Process(p).memory_info().rss for p in pids)

    def memory(self, users: int, batch: int = 1000) -> dict[str, float]:
        """`users` new users, one event each that gives the context 10 keys, through the shards: the growth of
        the shards' resident memory per user, and what 1,000,000 such users take."""
        import gc

        import ray

        gc.collect()
        before_users = sum(s["users"] for s in ray.get([x.stats.remote() for x in self.shards]))
        before = self.shard_rss()
        prefix = self._prefix("fill")
        t = time.perf_counter()
        for start in range(0, users, 100_000):
            evs = [{"id": f"{prefix}{i}", "campaign": "spring2026", "user": f"{prefix}u{i}", "type": "bench.fill",
                    "ts": T0 + i} for i in range(start, min(users, start + 100_000))]
            self.run_shards(evs, batch)
            self.say(f"    {min(users, start + 100_000):,} / {users:,} users filled "
                     f"({time.perf_counter() - t:.0f} s)")
        after = self.shard_rss()
        now_users = sum(s["users"] for s in ray.get([x.stats.remote() for x in self.shards]))
        per_user = (after - before) / users
        return {"users": users, "users_in_memory": now_users - before_users, "rss_before_bytes": before,
                "rss_after_bytes": after, "bytes_per_user": per_user, "million_users_bytes": per_user * 1e6,
                "fill_seconds": time.perf_counter() - t}

    def recovery(self, shard: int = 0) -> dict[str, float]:
        """Shard `shard`'s full recovery from Redis: every committed user of its key groups read (HSCAN) and
        restored into a fresh engine, as ShardCore.preload does (in this process, so the live shard is not
        fenced): seconds and users."""

        from playbus.actors.engine.engine import ShardEngine
        from playbus.actors.engine.keys import groups_of_shard
        from playbus.actors.service.shard import reload_groups
        from playbus.actors.store.commit import RedisStore
        from playbus.actors.store.connect import connect
        from playbus.config.loader import load_config

        config = load_config(self.workdir / "bench.yaml")
        engine = ShardEngine(config)
        store = RedisStore(connect(self.redis_url), config.key_groups)
        t = time.perf_counter()
        n = reload_groups(store, engine, groups_of_shard(shard, config.shards, config.key_groups))
        seconds = time.perf_counter() - t
        return {"users": n, "seconds": seconds, "users_per_s": n / seconds}

    # -- rounds ------------------------------------------------------------------------------------
    def measure(self, path: str, param: int, n: int, run: Callable[[list[dict[str, Any]]], Any],
                baseline_n: int) -> PathResult:
        """`rounds` times: the baseline, then the path on `n` fresh events; medians and CPU per event."""
        rounds: list[dict[str, float]] = []
        cpu_total: dict[str, float] = {}
        lat: list[float] = []
        base_cpu: dict[str, float] = {}
        for _ in range(self.rounds):
            self.meter.refresh()
            before = self.meter.sample()
            base = self.baseline(baseline_n)
            for g, us in CpuMeter.per_event(before, self.meter.sample(), baseline_n).items():
                base_cpu[g] = base_cpu.get(g, 0.0) + us / self.rounds
            evs = events(n, self.users, self._prefix(path))
            before = self.meter.sample()
            got = run(evs)
            after = self.meter.sample()
            eps, round_lat = got if isinstance(got, tuple) else (got, [])
            lat += round_lat
            for g, us in CpuMeter.per_event(before, after, n).items():
                cpu_total[g] = cpu_total.get(g, 0.0) + us / self.rounds
            rounds.append({"events_per_s": eps, "baseline_events_per_s": base, "ratio": eps / base})
        res = PathResult(path, param, statistics.median(r["events_per_s"] for r in rounds),
                         statistics.median(r["baseline_events_per_s"] for r in rounds),
                         statistics.median(r["ratio"] for r in rounds), rounds, cpu_total,
                         baseline_cpu_us_per_event=base_cpu)
        if lat:
            res.latency_ms = {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)}
        cpu = ", ".join(f"{g} {v:.1f}" for g, v in cpu_total.items() if v >= 0.05)
        cpu += "; baseline: " + ", ".join(f"{g} {base_cpu.get(g, 0.0):.1f}" for g in ("driver", "redis"))
        extra = f"  p50 {res.latency_ms['p50']:.1f} ms p99 {res.latency_ms['p99']:.1f} ms" if lat else ""
        self.say(f"  {path:<10} {param:>5}  {res.events_per_s:>9,.0f} events/s  {res.ratio:4.2f}x baseline "
                 f"({res.baseline_events_per_s:,.0f}/s){extra}\n      CPU us/event: {cpu}")
        return res


def run(quick: bool = False, users: int = 10_000, rounds: int = 3, memory_users: int | None = None,
        progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every path beside the baseline, then memory and recovery; the result document (see the module doc)."""
    logging.getLogger("ray").setLevel(logging.ERROR)
    n = 20_000 if quick else 60_000
    nb = 10_000 if quick else 30_000
    batches = [100, 500] if quick else [50, 100, 500, 1000, 2000]
    memory_users = memory_users if memory_users is not None else (50_000 if quick else 1_000_000)
    out: dict[str, Any] = {"users": users, "shards": 2, "events_per_round": n, "baseline_events_per_round": nb,
                           "rounds": rounds, "paths": []}
    os.environ.setdefault("PLAYBUS_ADMIN_TOKEN", bench_ops.TOKEN)  # the admin API of the operations measures
    with tempfile.TemporaryDirectory(prefix="playbus-bench-") as d, \
            ClusterBench(Path(d), users=users, rounds=rounds, progress=progress) as b:
        progress(f"cluster benchmark: {n:,} events a round, {rounds} rounds, {users:,} users, 2 shards; the "
                 f"baseline (Redis Lua, EVALSHA per event) runs {nb:,} events before every round")
        results: list[PathResult] = []
        for batch in batches:
            results.append(b.measure("shards", batch, n, partial(b.run_shards, batch=batch), nb))
        for batch in batches:
            results.append(b.measure("stream", batch, n, partial(b.run_stream, batch=batch), nb))
        results.append(b.measure("stream-in", 1, n, b.run_stream_in, nb))
        for per in ([100, 500] if quick else [50, 100, 500, 1000]):
            results.append(b.measure("http", per, n, partial(b._http, per_request=per, clients=4), nb))
        out["paths"] = [asdict(r) for r in results]
        seconds = 5 if quick else 20
        progress(f"  single-event HTTP requests at 50/s for {seconds} s ...")
        out["http_single"] = b.http_single(50, seconds)
        hs = out["http_single"]
        progress(f"  http-1     at 50 requests/s: p50 {hs['p50']:.1f} ms, p90 {hs['p90']:.1f} ms, "
                 f"p99 {hs['p99']:.1f} ms, max {hs['max']:.1f} ms")
        out["serve_noop"] = b.serve_noop(1000 if quick else 4000, 4)
        sn = out["serve_noop"]
        progress(f"  serve-noop {sn['requests_per_s']:>9,.0f} requests/s  p50 {sn['p50']:.1f} ms p99 "
                 f"{sn['p99']:.1f} ms (Serve alone: a 404 from the ingress, 4 clients)")
        ape = statistics.median(b.actor_per_event(10_000 if quick else 20_000) for _ in range(3))
        out["actor_per_event_events_per_s"] = ape
        progress(f"  actor-call {ape:>9,.0f} events/s (one Ray call per event)")
        sc = out["send"] = bench_linkage.send_cost(b, n // 4)
        progress(f"  send       {sc['with_sends_events_per_s']:>9,.0f} events/s decided with sends (half of them "
                 f"sent) vs {sc['external_events_per_s']:,.0f} external; a sent event costs {sc['send_cpu_us']:.0f} us "
                 f"of CPU in all, an external one {sc['external_cpu_us']:.0f} us ({sc['send_over_external']:.2f}x)")
        tl = out["timers"] = bench_linkage.timer_lateness(b, 5000 if quick else 20_000, 10, 2000)
        lt = tl["lateness_ms"]
        progress(f"  timers     {tl['timers']:,} due over 10 s beside 2,000 events/s: fired late by p50 "
                 f"{lt['p50']:.0f} ms, p99 {lt['p99']:.0f} ms, max {lt['max']:.0f} ms")
        ta = out["timers_at_once"] = bench_linkage.timers_at_once(b, 20_000 if quick else 100_000)
        progress(f"  timers     {ta['timers']:,} due at once (set in {ta['set_s']:.1f} s): the last fired "
                 f"{ta['last_fired_after_due_ms'] / 1000:.1f} s after due, p50 {ta['lateness_ms']['p50'] / 1000:.1f} s")
        ops: dict[str, Any] = {}
        act = ops["activate"] = bench_ops.activation_under_load(b, 20_000)
        progress(f"  activate   under 20,000 events/s: the call {act['call_ms']['median']:.0f} ms (max "
                 f"{act['call_ms']['max']:.0f}), the first event on the new version "
                 f"{act['first_event_on_it_ms']['median']:.0f} ms after the call began (max "
                 f"{act['first_event_on_it_ms']['max']:.0f})")
        pz = ops["pause"] = bench_ops.pause_under_load(b, 20_000)
        progress(f"  pause      under 20,000 events/s: the call {pz['call_ms']['median']:.0f} ms (max "
                 f"{pz['call_ms']['max']:.0f})")
        rs = ops["rescale"] = bench_ops.rescale_under_load(b, 20_000)
        progress("  rescale    under 20,000 events/s: " + ", ".join(
            f"to {r['to']} shards in {r['seconds']:.1f} s ({r['moved_groups']} key groups, paused "
            f"{r['pause_ms']:.0f} ms)" for r in rs["rescales"]) + f"; then {rs['partitions_behind_after']} "
                 "input partitions behind")
        rp = ops["replay"] = bench_ops.replay_speed(b, 2000 if quick else 10_000)
        progress(f"  replay     {rp['runs']:,} failed runs replayed in {rp['seconds']:.1f} s "
                 f"({rp['runs_per_s']:,.0f} a second)")
        out["ops"] = ops
        progress(f"  memory: {memory_users:,} users with a 10-key context each, through the shards ...")
        mem = out["memory"] = b.memory(memory_users)
        progress(f"  memory     {mem['bytes_per_user']:,.0f} B a user (shards' RSS "
                 f"{mem['rss_before_bytes'] / 2**20:,.0f} -> {mem['rss_after_bytes'] / 2**20:,.0f} MiB): "
                 f"1,000,000 users take {mem['million_users_bytes'] / 2**30:.2f} GiB")
        rec = out["recovery"] = b.recovery(0)
        progress(f"  recovery   shard 0 reloads {rec['users']:,} users from Redis in {rec['seconds']:.1f} s "
                 f"({rec['users_per_s']:,.0f} users/s)")
    progress("  scaling: the stream path with 1, 2 and 4 shards, each a cluster of its own ...")
    out["scaling"] = bench_scaling.run(20_000 if quick else 60_000, progress)
    progress("  the same 404 through Serve's proxy (run_cluster --serve-proxy): a second cluster ...")
    with tempfile.TemporaryDirectory(prefix="playbus-bench-proxy-") as d, \
            ClusterBench(Path(d), users=users, progress=progress, serve_proxy=True, warm=False) as b:
        sp = out["serve_noop_proxy"] = b.serve_noop(300 if quick else 1000, 4)
    progress(f"  serve-proxy {sp['requests_per_s']:>8,.0f} requests/s  p50 {sp['p50']:.1f} ms p99 {sp['p99']:.1f} ms "
             f"({out['serve_noop']['requests_per_s'] / sp['requests_per_s']:.0f}x fewer than the direct road)")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, one batch size per path (a smoke run)")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-users", type=int, help="users of the memory measurement (default 1,000,000)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    out = run(args.quick, args.users, args.rounds, args.memory_users, progress=lambda s: print(s, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
