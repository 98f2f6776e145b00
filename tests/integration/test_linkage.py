"""Rules that reach other users and the future, on a real Redis and real Ray shard actors: `send` across users
(assist, team fan-out) and durable timers (`later`, `cancel`), through duplicates, retries, kill -9 of shards, a
cluster restart, and 100,000 timers due at once.

One Ray session for the module; each test gets fresh shards on an emptied Redis (AOF, appendfsync always).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from playbus.actors.engine.keys import derived_event_id, group_prefix
from playbus.actors.service.http_api import IngressCore
from playbus.actors.store.server import RedisServer
from playbus.client import StreamProducer
from playbus.config.schema import Config
from tests.integration.cluster_helpers import (
    Cluster,
    outbox_actions,
    post_until_ok,
    statuses,
    stream_actions,
)
from tests.support.configs import make_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

CAMPAIGN = "c1"
LOTTERY = "playbus:actions:lottery"
DAY = 86_400_000

SCRIPTS = {
    # The assist gameplay sends assist.helped as the helper; the rule credits the inviter.
    "helped": """
function decide(event, ctx)
  local inviter = event.data.inviter
  if type(inviter) ~= "string" or inviter == event.user then return end
  ctx:incr("assist.helped", 1)
  send(inviter, "assist.credited", {helper = event.user})
end
""",
    # The inviter counts distinct helpers; the third earns 3 chances (once).
    "credited": """
function decide(event, ctx)
  ctx:incr("assist.credits", 1)
  local helpers = ctx:get("assist.helpers") or {}
  for _, h in ipairs(helpers) do if h == event.data.helper then return end end
  helpers[#helpers + 1] = event.data.helper
  ctx:set("assist.helpers", helpers)
  if #helpers == 3 then emit("lottery.grant_chance", {chances = 3}) end
end
""",
    # The leader's team.completed reaches every member with their role.
    "team_done": """
function decide(event, ctx)
  for _, m in ipairs(event.data.members) do
    send(m.user, "team.reward", {team = event.data.team, role = m.role})
  end
end
""",
    "team_reward": """
function decide(event, ctx)
  if ctx:get("team.paid") == event.data.team then return end
  ctx:set("team.paid", event.data.team)
  ctx:set("team.role", event.data.role)
  emit("wallet.grant_points", {points = event.data.role == "leader" and 1000 or 300})
  if event.data.role == "leader" then emit("lottery.grant_chance", {chances = 1}) end
end
""",
    # Timers on demand: data.delay ms later, optionally keyed (a new one with the same key replaces it).
    "arm": """
function decide(event, ctx)
  ctx:incr("timer.armed", 1)
  later(event.data.delay, "timer.fire", {n = event.data.n}, event.data.key)
end
""",
    "disarm": """
function decide(event, ctx) cancel(event.data.key) end
""",
    # A fired timer: counted, its number remembered, and a lottery ticket whose id proves it fired once.
    "fire": """
function decide(event, ctx)
  ctx:incr("timer.fired", 1)
  ctx:set("timer.last", event.data.n)
  ctx:set("timer.at", now())
  emit("lottery.grant_ticket", {n = event.data.n})
end
""",
}

RULES = [
    {"id": "helped", "on": "assist.helped", "script": "helped", "sends": ["assist.credited"]},
    {"id": "credited", "on": "assist.credited", "script": "credited", "emits": ["lottery.grant_chance"]},
    {"id": "team_done", "on": "team.completed", "script": "team_done", "sends": ["team.reward"]},
    {"id": "team_reward", "on": "team.reward", "script": "team_reward",
     "emits": ["wallet.grant_points", "lottery.grant_chance"]},
    {"id": "arm", "on": "timer.arm", "script": "arm", "sends": ["timer.fire"]},
    {"id": "disarm", "on": "timer.disarm", "script": "disarm"},
    {"id": "fire", "on": "timer.fire", "script": "fire", "emits": ["lottery.grant_ticket"]},
]


def now_ms() -> int:
    return int(time.time() * 1000)


def event(eid: str, user: str, type: str, ts: int | None = None, **data: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"id": eid, "campaign": CAMPAIGN, "user": user, "type": type,
                         "ts": now_ms() if ts is None else ts}
    if data:
        e["data"] = data
    return e


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-linkage"), appendfsync="always")
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return make_config(
        Path(tmp_path_factory.mktemp("linkage-config")), SCRIPTS, RULES, name="linkage.yaml", campaign=CAMPAIGN,
        starts="2026-01-01T00:00:00+08:00", ends="2028-01-01T00:00:00+08:00",
        targets={"lottery": {"stream": LOTTERY}, "wallet": {"webhook": "http://127.0.0.1:9/grant"}},
        shards=2, key_groups=16, dedup_window=256, batch={"max_events": 500, "max_wait_ms": 2},
        timers={"poll_ms": 50}, sandbox={"max_instructions": 200000, "max_memory_kb": 4096})


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def read(core: IngressCore, user: str) -> dict[str, Any]:
    """GET .../context: {"context", "timers"} as committed."""
    status, _, body = await core.handle("GET", f"/v1/campaigns/{CAMPAIGN}/users/{user}/context", "", {}, b"")
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


def wait_for(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `check()` until it returns a truthy value; that value."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def contexts(core: IngressCore, users: list[str]) -> dict[str, dict[str, Any]]:
    async def all_of() -> list[dict[str, Any]]:
        return await asyncio.gather(*(read(core, u) for u in users))

    return {u: doc["context"] for u, doc in zip(users, run(all_of()), strict=True)}


def test_assist_credits_the_inviter_across_users_through_duplicates_and_retries(cluster: Cluster,
                                                                                  redis_client: Any) -> None:
    core = cluster.core
    assert core is not None
    inviters = [f"inv{i}" for i in range(6)]
    helps = []
    for i, inv in enumerate(inviters):
        # four distinct helpers, one of them twice (a second help with a new id), and one self-help
        for j, helper in enumerate(("h1", "h2", "h2", "h3", "h4", inv)):
            helps.append(event(f"help-{i}-{j}", f"{helper}-{inv}" if helper != inv else inv, "assist.helped",
                               inviter=inv))
    results, _ = run(post_until_ok(core, helps))
    assert statuses(results) == ["applied"] * len(helps)
    # A producer retry of everything: duplicates, and no new send.
    again, _ = run(post_until_ok(core, helps))
    assert statuses(again) == ["duplicate"] * len(helps)

    def credited() -> dict[str, dict[str, Any]] | None:
        ctx = contexts(core, inviters)
        return ctx if all(c.get("assist.credits") == 5 for c in ctx.values()) else None

    ctx = wait_for(credited, what="every inviter credited 5 times")
    for inv in inviters:
        # helpers are other users (other shards): their credits arrive in commit order, not in posting order
        helpers = ctx[inv]["assist.helpers"]
        assert sorted(helpers) == [f"h{k}-{inv}" for k in range(1, 5)]
    time.sleep(0.5)  # nothing more arrives
    assert {u: c["assist.credits"] for u, c in contexts(core, inviters).items()} == {u: 5 for u in inviters}
    chances = [a for a in stream_actions(redis_client, LOTTERY) if a["type"] == "lottery.grant_chance"]
    assert sorted(a["user"] for a in chances) == sorted(inviters)
    assert all(a["params"] == {"chances": 3} for a in chances)
    # The credited event carries its deterministic id and cause.
    first = chances[0]
    assert first["cause"].startswith("s-")
    helper_ids = {derived_event_id("s", CAMPAIGN, f"h{k}-{first['user']}", f"help-{inviters.index(first['user'])}-"
                                   f"{j}", "helped", 0) for k, j in ((1, 0), (2, 1), (2, 2), (3, 3), (4, 4))}
    assert first["cause"] in helper_ids


def test_team_completed_fans_out_to_every_member_by_role(cluster: Cluster, redis_client: Any) -> None:
    core = cluster.core
    assert core is not None
    members = [{"user": "lead", "role": "leader"}] + [{"user": f"m{i}", "role": "member"} for i in range(5)]
    done = event("team-1-done", "lead", "team.completed", team="t1", members=members)
    results, _ = run(post_until_ok(core, [done]))
    assert statuses(results) == ["applied"]
    users = [m["user"] for m in members]
    ctx = wait_for(lambda: (c := contexts(core, users)) and all(x.get("team.paid") == "t1" for x in c.values())
                   and c, what="every member paid")
    assert {u: c["team.role"] for u, c in ctx.items()} == {m["user"]: m["role"] for m in members}
    # The gameplay resends the completion (same id): nothing more.
    results, _ = run(post_until_ok(core, [done]))
    assert statuses(results) == ["duplicate"]
    time.sleep(0.5)
    points = [a for a in outbox_actions(redis_client, 16) if a["type"] == "wallet.grant_points"]
    assert sorted((a["user"], a["params"]["points"]) for a in points) == sorted(
        (m["user"], 1000 if m["role"] == "leader" else 300) for m in members)
    chances = [a for a in stream_actions(redis_client, LOTTERY) if a["type"] == "lottery.grant_chance"]
    assert [a["user"] for a in chances] == ["lead"]


def test_timers_fire_once_replaced_and_cancelled_ones_do_not_and_pending_ones_show(cluster: Cluster,
                                                                                   redis_client: Any) -> None:
    core = cluster.core
    assert core is not None
    t = now_ms()
    evs = [
        event("a1", "ta", "timer.arm", t, delay=600, n=1, key="k"),        # replaced by a2 before it is due
        event("a2", "ta", "timer.arm", t + 1, delay=900, n=2, key="k"),
        event("b1", "tb", "timer.arm", t, delay=600, n=1, key="k"),        # cancelled
        event("b2", "tb", "timer.disarm", t + 1, key="k"),
        event("c1", "tc", "timer.arm", t, delay=500, n=1),                 # two unkeyed timers: both fire
        event("c2", "tc", "timer.arm", t, delay=700, n=2),
        event("d1", "td", "timer.arm", t, delay=DAY, n=1, key="far"),      # pending for a day
    ]
    results, _ = run(post_until_ok(core, evs))
    assert statuses(results) == ["applied"] * len(evs)
    pending = run(read(core, "td"))["timers"]
    assert pending == [{"key": "far", "id": derived_event_id("t", CAMPAIGN, "td", "d1", "arm", 0),
                        "type": "timer.fire", "due": t + DAY}]
    assert len(run(read(core, "ta"))["timers"]) == 1 and run(read(core, "tb"))["timers"] == []

    wait_for(lambda: (c := contexts(core, ["ta", "tc"])) and c["ta"].get("timer.fired") == 1
             and c["tc"].get("timer.fired") == 2, what="the timers due")
    time.sleep(1.0)  # past every due time: nothing else fires
    ctx = contexts(core, ["ta", "tb", "tc", "td"])
    assert ctx["ta"]["timer.fired"] == 1 and ctx["ta"]["timer.last"] == 2 and ctx["ta"]["timer.at"] == t + 901
    assert "timer.fired" not in ctx["tb"] and "timer.fired" not in ctx["td"]
    assert ctx["tc"]["timer.fired"] == 2 and ctx["tc"]["timer.last"] == 2
    tickets = [a for a in stream_actions(redis_client, LOTTERY) if a["type"] == "lottery.grant_ticket"]
    assert sorted((a["user"], a["params"]["n"]) for a in tickets) == [("ta", 2), ("tc", 1), ("tc", 2)]
    assert run(read(core, "ta"))["timers"] == [] and len(run(read(core, "td"))["timers"]) == 1
    # Only the day-long timer is left in Redis.
    left = sum(redis_client.zcard(group_prefix(kg) + "timers") for kg in range(16))
    assert left == 1
    # Fired within a second of due (here: tens of ms).
    health = ray.get([s.health.remote() for s in cluster.shards])
    late = [h["timers"]["lateness_ms"]["max"] for h in health if h["timers"]["lateness_ms"]]
    assert late and max(late) < 1000, health
    assert sum(h["timers"]["fired"] for h in health) == 3
    assert sum(h["fired"] for h in health) == 3 and sum(h["timers_set"] for h in health) == 6


def test_kill_9_of_shards_while_sends_and_timers_are_in_flight_loses_nothing_and_doubles_nothing(
        cluster: Cluster, redis_client: Any) -> None:
    core = cluster.core
    assert core is not None
    rng = random.Random(9)
    inviters = [f"kinv{i}" for i in range(12)]
    clocks = [f"kclk{i}" for i in range(24)]
    want_credits: Counter[str] = Counter()
    want_fired: Counter[str] = Counter()
    plan: list[list[list[dict[str, Any]]]] = []
    for p in range(3):
        mine = []
        for b in range(12):
            batch = []
            for j in range(40):
                eid = f"k{p}-{b}-{j}"
                if rng.random() < 0.5:
                    inv = rng.choice(inviters)
                    batch.append(event(eid, f"khelp{p}-{j % 7}", "assist.helped", inviter=inv))
                    want_credits[inv] += 1
                else:
                    user = rng.choice(clocks)
                    batch.append(event(eid, user, "timer.arm", delay=rng.randrange(100, 2500), n=j))
                    want_fired[user] += 1
            mine.append(batch)
        plan.append(mine)
    total = sum(len(m) for m in plan)
    progress = {"answered": 0}
    killed: list[tuple[int, int]] = []

    async def producer(batches: list[list[dict[str, Any]]]) -> None:
        for batch in batches:
            results, _ = await post_until_ok(core, batch)
            assert [r["id"] for r in results] == [x["id"] for x in batch]
            progress["answered"] += 1
            await asyncio.sleep(0.05)  # timers come due while later batches and the kills go on

    async def killer() -> None:
        for shard, at in ((0, total // 4), (1, total // 2), (0, 3 * total // 4)):
            pid = await cluster.pid(shard)
            while progress["answered"] < at:
                await asyncio.sleep(0.002)
            os.kill(pid, signal.SIGKILL)
            killed.append((shard, pid))
            await cluster.pid(shard)  # Ray restarts it
        # and once more after the last batch, while timers are still due
        await asyncio.sleep(0.3)
        pid = await cluster.pid(1)
        os.kill(pid, signal.SIGKILL)
        killed.append((1, pid))
        await cluster.pid(1)

    async def scenario() -> None:
        await asyncio.gather(killer(), *(producer(b) for b in plan))

    run(scenario())
    assert len(killed) == 4

    def settled() -> dict[str, dict[str, Any]] | None:
        ctx = contexts(core, inviters + clocks)
        done = all(ctx[u].get("assist.credits", 0) >= n for u, n in want_credits.items()) and \
            all(ctx[u].get("timer.fired", 0) >= n for u, n in want_fired.items())
        return ctx if done else None

    wait_for(settled, timeout=90, what="every credit and every timer")
    time.sleep(1.0)
    ctx = contexts(core, inviters + clocks)
    assert {u: ctx[u].get("assist.credits", 0) for u in inviters} == {u: want_credits[u] for u in inviters}
    assert {u: ctx[u].get("timer.fired", 0) for u in clocks} == {u: want_fired[u] for u in clocks}
    assert {u: ctx[u].get("timer.armed", 0) for u in clocks} == {u: want_fired[u] for u in clocks}
    tickets = [a["id"] for a in stream_actions(redis_client, LOTTERY) if a["type"] == "lottery.grant_ticket"]
    assert len(tickets) == sum(want_fired.values()) and len(set(tickets)) == len(tickets)
    assert sum(redis_client.zcard(group_prefix(kg) + "timers") for kg in range(16)) == 0
    assert sum(redis_client.hlen(group_prefix(kg) + "timer_events") for kg in range(16)) == 0


def test_timers_due_while_the_cluster_is_down_fire_once_when_it_is_back(cluster: Cluster, redis_client: Any) -> None:
    core = cluster.core
    assert core is not None
    users = [f"rst{i}" for i in range(40)]
    t = now_ms()
    arms = [event(f"r-{u}", u, "timer.arm", t, delay=800, n=1, key="k") for u in users]
    results, _ = run(post_until_ok(core, arms))
    assert statuses(results) == ["applied"] * len(users)
    cluster.stop()
    time.sleep(1.5)  # every timer comes due while no shard runs
    assert sum(redis_client.zcard(group_prefix(kg) + "timers") for kg in range(16)) == len(users)
    core = cluster.start()
    wait_for(lambda: all(c.get("timer.fired") == 1 for c in contexts(core, users).values()), what="the late timers")
    time.sleep(0.5)
    assert all(c.get("timer.fired") == 1 and c.get("timer.at") == t + 800 for c in contexts(core, users).values())
    tickets = [a for a in stream_actions(redis_client, LOTTERY) if a["type"] == "lottery.grant_ticket"]
    assert sorted(a["user"] for a in tickets) == sorted(users)


def test_100000_timers_due_at_once_all_fire_exactly_once(cluster: Cluster, redis_server: RedisServer,
                                                           redis_client: Any) -> None:
    """A campaign-wide deadline: 100,000 users' timers due at the same millisecond."""
    n = 100_000
    started = time.monotonic()
    due = now_ms() + 15_000  # setting them takes about 3 s here
    producer = StreamProducer(redis_server.client(), key_groups=16, batch=1000)
    t = now_ms()
    producer.send_many(event(f"dl-{i}", f"dl{i}", "timer.arm", t, delay=due - t, n=i, key="deadline")
                       for i in range(n))

    def all_set() -> int:
        count = sum(redis_client.zcard(group_prefix(kg) + "timers") for kg in range(16))
        return count if count == n else 0

    wait_for(all_set, timeout=max(1.0, (due - now_ms()) / 1000), what=f"{n} timers set before they are due")
    set_s = time.monotonic() - started
    wait_for(lambda: redis_client.xlen(LOTTERY) >= n, timeout=120, what="every timer fired")
    fired_s = now_ms() / 1000 - due / 1000
    time.sleep(0.5)
    entries = redis_client.xrange(LOTTERY)
    ids = [json.loads(f[b"action"])["id"] for _, f in entries]
    assert len(ids) == n and len(set(ids)) == n
    last_ms = max(int(eid.split(b"-")[0]) for eid, _ in entries)
    assert sum(redis_client.zcard(group_prefix(kg) + "timers") for kg in range(16)) == 0
    health = ray.get([s.health.remote() for s in cluster.shards])
    print(f"\n100,000 timers: set in {set_s:.1f} s through the partitions; all fired {(last_ms - due) / 1000:.2f} s "
          f"after due (observed {fired_s:.2f} s); lateness per shard (ms): "
          f"{[h['timers']['lateness_ms'] for h in health]}")
