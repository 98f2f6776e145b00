"""Cluster benchmark (issue: the cluster): real Ray actors, a real redis-server, durable commits.

    python -m playbus.loadtest.bench_cluster [--events N] [--users N] [--shards N] [--only NAME ...]

Side by side in one run, as events/s and ratios:
  actor-per-event   baseline: one Ray actor call per event (pipelined, a no-op method)
  redis-lua         baseline: the same decision as a Redis Lua script, EVALSHA per event, pipelined
  shards            driver -> UserActivityActor shards in batches of 500, durable commit before the answer
  http              POST /v1/events through Ray Serve, 500 events a request, several clients
  stream            XADD playbus:in, the stream reader feeds the shards
with p50/p99 of the shards' commit and of an HTTP request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

from playbus.loadtest.bench_engine import CONFIG as BENCH_CONFIG
from playbus.loadtest.bench_engine import FIRST_QUIZ as RULE
from playbus.loadtest.bench_engine import T0
from playbus.loadtest.stats import percentile

RULE_LINE = ("      - {id: first_quiz_lottery, on: quiz.answered, script: first_quiz_lottery.lua, "
             "emits: [lottery.grant_chance]}")


def config_text(shards: int) -> str:
    """bench_engine's campaign with the one first-quiz rule, and this benchmark's shards and batch size."""
    return (f"shards: {shards}\nkey_groups: 128\nbatch: {{max_events: 500, max_wait_ms: 2}}\n"
            + BENCH_CONFIG.replace("RULES", RULE_LINE))


REDIS_DECISION = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[2], 'quiz.answered', 1)
if n == 1 then redis.call('XADD', KEYS[3], '*', 'action', ARGV[2]) end
return 1
"""


def _cpu(r: Any, shards: list[Any]) -> dict[str, float]:
    """CPU seconds so far of the driver, the shard processes and redis-server."""
    import ray

    info = r.info("cpu")
    return {"driver": time.process_time(), "shards": sum(ray.get([s.cpu_seconds.remote() for s in shards])),
            "redis": info["used_cpu_user"] + info["used_cpu_sys"]}


def _events(n: int, users: int, prefix: str) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "campaign": "spring2026", "user": f"u{i % users}", "type": "quiz.answered",
             "ts": T0 + i, "data": {"correct": True}} for i in range(n)]


class _Echo:
    def call(self, x: bytes) -> bytes:
        return x


def bench_actor_per_event(n: int) -> float:
    import ray

    echo: Any = ray.remote(num_cpus=0)(_Echo)
    actors = [echo.remote(), echo.remote()]
    ray.get([a.call.remote(b"") for a in actors])
    payload = msgpack.packb(_events(1, 1, "x")[0])
    t = time.perf_counter()
    refs = [actors[i % 2].call.remote(payload) for i in range(n)]
    ray.get(refs)
    return n / (time.perf_counter() - t)


def bench_redis_lua(url: str, n: int, users: int) -> float:
    import redis

    r = redis.Redis.from_url(url)
    script = r.register_script(REDIS_DECISION)
    script(keys=["b:seen:x", "b:ctx:x", "b:out"], args=["warm", "{}"])
    sha = script.sha
    action = json.dumps({"type": "lottery.grant_chance", "params": {"chances": 1}})
    t = time.perf_counter()
    for start in range(0, n, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            u = f"u{i % users}"
            pipe.evalsha(sha, 3, f"b:seen:{u}", f"b:ctx:{u}", "b:out", f"r{i}", action)
        pipe.execute()
    return n / (time.perf_counter() - t)


async def _drive_shards(shards: list[Any], router: Any, events: list[dict[str, Any]], batch: int,
                        inflight: int) -> tuple[float, list[float]]:
    sem = asyncio.Semaphore(inflight)
    lat: list[float] = []

    async def one(chunk: list[dict[str, Any]]) -> None:
        async with sem:
            t = time.perf_counter()
            parts = router.split(chunk)
            replies = await asyncio.gather(*(shards[s].process.remote(msgpack.packb(evs))
                                             for s, (_, evs) in parts.items()))
            for r in replies:
                assert all(x["status"] == "applied" for x in msgpack.unpackb(r, raw=False))
            lat.append((time.perf_counter() - t) * 1000)

    t = time.perf_counter()
    await asyncio.gather(*(one(events[i:i + batch]) for i in range(0, len(events), batch)))
    return len(events) / (time.perf_counter() - t), lat


async def _drive_http(url: str, events: list[dict[str, Any]], per_request: int, clients: int
                      ) -> tuple[float, list[float]]:
    import aiohttp

    chunks = [msgpack.packb(events[i:i + per_request]) for i in range(0, len(events), per_request)]
    lat: list[float] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            t = time.perf_counter()
            async with session.post(url + "/v1/events", data=body,
                                    headers={"content-type": "application/msgpack"}) as resp:
                doc = await resp.json()
                assert resp.status == 200, doc
            lat.append((time.perf_counter() - t) * 1000)

    async with aiohttp.ClientSession() as session:
        t = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return len(events) / (time.perf_counter() - t), lat


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--inflight", type=int, default=4, help="driver batches in flight")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args(argv)
    want = set(args.only or ["actor-per-event", "redis-lua", "shards", "http", "stream"])

    import ray
    import redis
    from ray import serve

    from playbus.actors.edge.serve_app import Ingress
    from playbus.actors.edge.shard_actor import UserActivityActor
    from playbus.actors.edge.stream_actor import StreamIngressActor
    from playbus.actors.service.router import Router
    from playbus.actors.store.server import RedisServer
    from playbus.config.loader import parse_config

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d, RedisServer(Path(d) / "redis") as srv:
        (Path(d) / "first_quiz_lottery.lua").write_text(RULE)
        cfg = parse_config(config_text(args.shards), base_dir=Path(d))
        ray.init(include_dashboard=False, num_cpus=2, logging_level=logging.ERROR, log_to_driver=False)
        n = args.events
        print(f"cluster benchmark: {n:,} events, {args.users:,} users, {args.shards} shards, "
              f"batches of {args.batch}; redis {srv.url}", flush=True)
        if "actor-per-event" in want:
            m = min(n, 20_000)
            out["actor_per_event_events_per_s"] = bench_actor_per_event(m)
            print(f"  actor call per event       {out['actor_per_event_events_per_s']:>10,.0f} events/s", flush=True)
        if "redis-lua" in want:
            out["redis_lua_events_per_s"] = bench_redis_lua(srv.url, n, args.users)
            print(f"  redis lua per event        {out['redis_lua_events_per_s']:>10,.0f} events/s", flush=True)
        shards = [UserActivityActor.remote(cfg, i, srv.url) for i in range(cfg.shards)]
        ray.get([s.health.remote() for s in shards])
        router = Router(cfg.shards, cfg.key_groups)
        if "shards" in want:
            asyncio.run(_drive_shards(shards, router, _events(5000, args.users, "w"), args.batch, args.inflight))
            ray.get([s.reset_stats.remote() for s in shards])
            rcl = redis.Redis.from_url(srv.url)
            cpu0 = _cpu(rcl, shards)
            eps, lat = asyncio.run(_drive_shards(shards, router, _events(n, args.users, "s"), args.batch,
                                                 args.inflight))
            cpu1 = _cpu(rcl, shards)
            per = {k: (cpu1[k] - cpu0[k]) / n * 1e6 for k in cpu0}
            out.update({f"cpu_us_per_event_{k}": v for k, v in per.items()})
            print("  CPU per event (us): " + ", ".join(f"{k} {v:.1f}" for k, v in per.items()), flush=True)
            commits = [c for s in ray.get([x.commit_latencies.remote() for x in shards]) for c in s]
            out.update(shards_events_per_s=eps, batch_p50_ms=percentile(lat, 0.5), batch_p99_ms=percentile(lat, 0.99),
                       commit_p50_ms=percentile(commits, 0.5), commit_p99_ms=percentile(commits, 0.99),
                       commits=len(commits), mean_commit_events=n / max(1, len(commits)))
            print(f"  driver -> shards (500/batch){eps:>10,.0f} events/s   batch p50 {out['batch_p50_ms']:.1f} ms "
                  f"p99 {out['batch_p99_ms']:.1f} ms; commit p50 {out['commit_p50_ms']:.2f} ms "
                  f"p99 {out['commit_p99_ms']:.2f} ms over {len(commits)} commits", flush=True)
        if "http" in want:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            serve.run(Ingress.bind(  # type: ignore[attr-defined]
                cfg, shards, srv.url), name="bench", route_prefix="/")
            url = f"http://127.0.0.1:{args.port}"
            asyncio.run(_drive_http(url, _events(5000, args.users, "hw"), 500, args.clients))
            eps, lat = asyncio.run(_drive_http(url, _events(n, args.users, "h"), 500, args.clients))
            out.update(http_events_per_s=eps, http_p50_ms=percentile(lat, 0.5), http_p99_ms=percentile(lat, 0.99))
            print(f"  HTTP (500/request)         {eps:>10,.0f} events/s   request p50 {out['http_p50_ms']:.1f} ms "
                  f"p99 {out['http_p99_ms']:.1f} ms", flush=True)
            serve.shutdown()  # type: ignore[no-untyped-call]
        if "stream" in want:
            r = redis.Redis.from_url(srv.url)
            reader = StreamIngressActor.remote(cfg, shards, srv.url)
            ray.get(reader.start.remote())
            events = _events(n, args.users, "x")
            t = time.perf_counter()
            for i in range(0, n, 1000):
                pipe = r.pipeline(transaction=False)
                for e in events[i:i + 1000]:
                    pipe.xadd("playbus:in", {"event": msgpack.packb(e)})
                pipe.execute()
            add_s = time.perf_counter() - t
            while True:
                st = ray.get(reader.stats.remote())
                if st["applied"] + st["duplicates"] + st["rejected"] >= n:
                    break
                time.sleep(0.05)
            total = time.perf_counter() - t
            out.update(stream_events_per_s=n / total, stream_xadd_s=add_s)
            print(f"  stream ingress             {n / total:>10,.0f} events/s   (XADD took {add_s:.2f} s of "
                  f"{total:.2f} s)", flush=True)
            ray.get(reader.stop.remote())
        ray.shutdown()
    base = out.get("actor_per_event_events_per_s")
    if base and "shards_events_per_s" in out:
        out["shards_vs_actor_per_event"] = out["shards_events_per_s"] / base
    if out.get("redis_lua_events_per_s") and "shards_events_per_s" in out:
        out["shards_vs_redis_lua"] = out["shards_events_per_s"] / out["redis_lua_events_per_s"]
    for k in ("shards_vs_actor_per_event", "shards_vs_redis_lua"):
        if k in out:
            print(f"  ratio {k}: {out[k]:.1f}x", flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
