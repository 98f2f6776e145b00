"""Engine benchmark (issue: decision engine): events/s of ShardEngine on one core, beside the raw lupa floor.

    python -m playbus.loadtest.bench_engine [--events N] [--users N] [--batch N]

Measured side by side in one run (this machine varies up to 2x between runs):
  floor      a bare Python loop calling one Lua function per event through lupa (5 scalar arguments), and
             the same with the event dict converted by table_from (DESIGN.md's ~680,000/s line)
  engine x1  ShardEngine.process in micro-batches, one sandboxed Lua rule per event (budget and memory cap on)
  engine x3  the same with three rules per event
  memory     bytes per user for a 10-key context, 100,000 users (Lua context + Python state)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import lupa.lua54 as lua54
import msgpack

from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.events import decode_events
from playbus.config.loader import parse_config

T0 = 1769000000000
FIRST_QUIZ = """
function decide(event, ctx)
  local n = ctx:incr("quiz.answered", 1)
  if n == 1 then emit("lottery.grant_chance", {chances = 1}) end
end
"""
STREAK = """
function decide(event, ctx)
  local d = today()
  if ctx:get("checkin.last") ~= d then
    ctx:set("checkin.last", d)
    ctx:incr("checkin.days", 1)
  end
end
"""
TIER = """
function decide(event, ctx)
  if event.data.correct then ctx:incr("quiz.correct", 1) end
end
"""
TEN_KEYS = """
function decide(event, ctx)
  for i = 1, 10 do ctx:set("game" .. i .. ".value", i * 1000) end
end
"""
CONFIG = """
targets:
  lottery: {stream: "playbus:actions:lottery"}
campaigns:
  - id: spring2026
    timezone: Asia/Shanghai
    starts: 2026-01-20T00:00:00+08:00
    ends: 2026-02-20T00:00:00+08:00
    rules:
RULES
"""


def _engine(tmp: Path, rules: list[tuple[str, str]], other_rules: int = 0) -> ShardEngine:
    """An engine with `rules` on quiz.answered, and `other_rules` more rules on other event types (which the
    benchmark's events never match: the rule index by event type makes them cost nothing)."""
    lines = []
    for name, src in rules:
        (tmp / f"{name}.lua").write_text(src)
        lines.append(f"      - {{id: {name}, on: quiz.answered, script: {name}.lua, emits: [lottery.grant_chance]}}")
    if other_rules:
        (tmp / "other.lua").write_text(TIER)
    for i in range(other_rules):
        lines.append(f"      - {{id: other{i}, on: other.type{i}, script: other.lua}}")
    return ShardEngine(parse_config(CONFIG.replace("RULES", "\n".join(lines)), base_dir=tmp))


def _events(n: int, users: int, prefix: str = "e") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "campaign": "spring2026", "user": f"u{i % users}", "type": "quiz.answered",
             "ts": T0 + i, "data": {"correct": i % 3 == 0}} for i in range(n)]


def bench_floor(n: int) -> float:
    lua = lua54.LuaRuntime()
    f = lua.eval("function(id, user, typ, ts, n) if n == 1 then return id end return nil end")
    t = time.process_time()
    for i in range(n):
        f("e", "u1", "quiz.answered", T0, i)
    return n / (time.process_time() - t)


def bench_floor_table(n: int) -> float:
    """The floor as DESIGN.md measures it: one Lua call per event, the event converted with table_from."""
    lua = lua54.LuaRuntime()
    f = lua.eval("function(e) if e.ts == 1 then return e.id end return nil end")
    table_from = lua.table_from
    events = _events(n, 10_000, "f")
    t = time.process_time()
    for e in events:
        f(table_from(e))
    return n / (time.process_time() - t)


def decoded(events: list[dict[str, Any]]) -> list[Any]:
    """The events as a shard receives them: decoded and checked from msgpack (EventIn structs)."""
    return decode_events(msgpack.packb(events))


def bench_engine(tmp: Path, rules: list[tuple[str, str]], n: int, users: int, batch: int,
                 other_rules: int = 0, engine: ShardEngine | None = None, prefix: str = "e") -> float:
    """ShardEngine.process over `n` decoded events in batches of `batch` (CPU time of this process)."""
    eng = engine if engine is not None else _engine(tmp, rules, other_rules)
    if engine is None:
        eng.process(decoded(_events(min(n, 5000), users, "warm")), T0)  # warm up: contexts exist
    events = decoded(_events(n, users, prefix))
    chunks = [events[i:i + batch] for i in range(0, n, batch)]
    t = time.process_time()
    for chunk in chunks:
        eng.process(chunk, T0)
    return n / (time.process_time() - t)


def interleaved(engines: list[ShardEngine], n: int, users: int, batch: int, prefix: str) -> list[float]:
    """The table_from floor and each engine, batch by batch in turn (so that this machine's drift hits them
    alike): events/s of CPU time of each, the floor first."""
    lua = lua54.LuaRuntime()
    f = lua.eval("function(e) if e.ts == 1 then return e.id end return nil end")
    table_from = lua.table_from
    floor_events = _events(n, users, f"{prefix}f")
    streams = [decoded(_events(n, users, f"{prefix}{j}-")) for j in range(len(engines))]
    spent = [0.0] * (len(engines) + 1)
    clock = time.process_time
    for i in range(0, n, batch):
        t = clock()
        for e in floor_events[i:i + batch]:
            f(table_from(e))
        spent[0] += clock() - t
        for j, eng in enumerate(engines):
            t = clock()
            eng.process(streams[j][i:i + batch], T0)
            spent[j + 1] += clock() - t
    return [n / s for s in spent]


def bench_memory(tmp: Path, users: int, events_per_user: int = 1) -> dict[str, float]:
    """Bytes per user after `events_per_user` events each, all within the dedup horizon (so every id is kept:
    32 fills the default dedup window; 1,000 is a very active user's ten minutes)."""
    eng = _engine(tmp, [("ten", TEN_KEYS)])
    base_lua = eng.sandbox.memory_kb()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for r in range(events_per_user):
        for i in range(0, users, 1000):
            eng.process([{"id": f"m{r}-{j}", "campaign": "spring2026", "user": f"user-{j:08d}",
                          "type": "quiz.answered", "ts": T0} for j in range(i, min(users, i + 1000))], T0)
            eng.take_dirty()
    gc.collect()
    py = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    lua = (eng.sandbox.memory_kb() - base_lua) * 1024
    assert eng.context("spring2026", "user-00000007")["game10.value"] == 10000
    return {"lua_bytes_per_user": lua / users, "python_bytes_per_user": py / users,
            "total_bytes_per_user": (lua + py) / users}


def bench_dedup_memory(tmp: Path, users: int = 20, events_per_user: int = 1000) -> dict[str, float]:
    """The size of the dedup memory (digests and receive times, as Python objects) of users who each sent
    `events_per_user` events within the dedup horizon."""
    eng = _engine(tmp, [("first_quiz", FIRST_QUIZ)])
    for r in range(events_per_user):
        eng.process([{"id": f"h{r}-{j}", "campaign": "spring2026", "user": f"hot-{j}", "type": "quiz.answered",
                      "ts": T0} for j in range(users)], T0)
    sizes = [sys.getsizeof(st.seen) + sys.getsizeof(st.stamps) for st in eng.users.values()]
    ids = sum(len(st.seen) // 8 for st in eng.users.values())
    return {"hot_user_dedup_bytes": sum(sizes) / len(sizes), "dedup_bytes_per_id": sum(sizes) / ids}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--memory-users", type=int, default=100_000)
    args = p.parse_args(argv)
    # The shard actor runs with a relaxed cyclic GC (its allocations are acyclic dicts and tuples);
    # the benchmark does the same and reports the default too.
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"engine benchmark: {args.events:,} events, {args.users:,} users, batches of {args.batch}", flush=True)
        out["floor_events_per_s"] = bench_floor(args.events)
        print(f"  floor (lupa call per event)   {out['floor_events_per_s']:>12,.0f} events/s", flush=True)
        out["floor_table_from_events_per_s"] = bench_floor_table(args.events)
        print(f"  floor, event via table_from   {out['floor_table_from_events_per_s']:>12,.0f} events/s", flush=True)
        gc.set_threshold(50_000, 50, 100)
        out["engine_1_rule_events_per_s"] = bench_engine(tmp, [("first_quiz", FIRST_QUIZ)], args.events,
                                                         args.users, args.batch)
        out["engine_3_rules_events_per_s"] = bench_engine(
            tmp, [("first_quiz", FIRST_QUIZ), ("streak", STREAK), ("tier", TIER)], args.events, args.users, args.batch)
        gc.set_threshold(700, 10, 10)
        out["engine_1_rule_default_gc_events_per_s"] = bench_engine(tmp, [("first_quiz", FIRST_QUIZ)], args.events,
                                                                    args.users, args.batch)
        for key, label in (("engine_1_rule_events_per_s", "engine, 1 rule per event"),
                           ("engine_3_rules_events_per_s", "engine, 3 rules per event"),
                           ("engine_1_rule_default_gc_events_per_s", "engine, 1 rule, default gc")):
            ratio = out[key] / out["floor_events_per_s"]
            ratio2 = out[key] / out["floor_table_from_events_per_s"]
            print(f"  {label:<30}{out[key]:>12,.0f} events/s  ({ratio:.2f}x floor, {ratio2:.2f}x table_from floor)",
                  flush=True)
        mem = bench_memory(tmp, args.memory_users)
        out.update(mem)
        print(f"  memory, 10-key context, {args.memory_users:,} users: {mem['total_bytes_per_user']:.0f} B/user "
              f"(Lua {mem['lua_bytes_per_user']:.0f} + Python {mem['python_bytes_per_user']:.0f})", flush=True)
        full = bench_memory(tmp, args.memory_users, events_per_user=32)
        out.update({f"full_window_{k}": v for k, v in full.items()})
        print(f"  the same with a full dedup window (32 events each): {full['total_bytes_per_user']:.0f} B/user "
              f"(Lua {full['lua_bytes_per_user']:.0f} + Python {full['python_bytes_per_user']:.0f})", flush=True)
        out.update(bench_dedup_memory(tmp))
        print(f"  a very active user (1,000 events in the 10-minute dedup horizon): its dedup memory "
              f"{out['hot_user_dedup_bytes']:,.0f} B, {out['dedup_bytes_per_id']:.1f} B per remembered id",
              flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
