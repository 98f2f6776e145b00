"""Sends and timers in Redis without Ray: what a commit writes for them, the timer firer on a real Redis feeding
a real ShardCore, its repair of an orphan entry, and a timers key of the wrong type refused before any write."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.engine.keys import group_prefix, key_group, user_key
from playbus.actors.service.partition_reader import decode_entry
from playbus.actors.service.shard import ShardCore
from playbus.actors.service.timer_firer import TimerFirer
from playbus.actors.store.errors import StoreError
from playbus.actors.store.server import RedisServer
from playbus.config.schema import Config
from tests.support.configs import make_config

KG = 8
SCRIPTS = {
    "helped": 'function decide(e, ctx) send(e.data.inviter, "assist.credited", {helper = e.user}) end',
    "arm": 'function decide(e, ctx) later(e.data.delay, "timer.fire", {n = e.data.n}, e.data.key) end',
    "fire": 'function decide(e, ctx) ctx:incr("fired", 1) ctx:set("last", e.data.n) end',
}
RULES = [
    {"id": "helped", "on": "assist.helped", "script": "helped", "sends": ["assist.credited"]},
    {"id": "arm", "on": "timer.arm", "script": "arm", "sends": ["timer.fire"]},
    {"id": "fire", "on": "timer.fire", "script": "fire"},
]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, SCRIPTS, RULES, campaign="c1", starts="2026-01-01T00:00:00+08:00",
                       ends="2028-01-01T00:00:00+08:00", shards=1, key_groups=KG)


def ev(eid: str, user: str, etype: str, ts: int, **data: Any) -> dict[str, Any]:
    return {"id": eid, "campaign": "c1", "user": user, "type": etype, "ts": ts, "data": data}


def group(user: str) -> int:
    return key_group(user_key("c1", user), KG)


def test_a_send_lands_in_the_targets_partition_with_the_senders_commit(clean_redis: Any, config: Config,
                                                                       redis_server: RedisServer) -> None:
    core = ShardCore(config, 0, redis_server.url)
    now = int(time.time() * 1000)
    [res] = core.process([ev("e1", "h1", "assist.helped", now, inviter="inv")])
    assert res["status"] == "applied"
    entries = clean_redis.xrange(group_prefix(group("inv")) + "in")
    assert len(entries) == 1
    [sent], reason = decode_entry(entries[0][1])
    assert reason == "" and (sent.user, sent.type, sent.cause, sent.depth) == ("inv", "assist.credited", "e1", 1)
    # The target's own shard decides it (here the same core), once: a second delivery is a duplicate.
    assert core.process([sent])[0]["status"] == "applied"
    assert core.process([sent])[0]["status"] == "duplicate"
    assert core.store.journal(user_key("c1", "h1"))[0]["effects"][0]["send"] == "inv"


def test_the_firer_fires_due_timers_once_through_the_shard_and_skips_replaced_ones(clean_redis: Any, config: Config,
                                                                                   redis_server: RedisServer) -> None:
    core = ShardCore(config, 0, redis_server.url)
    now = int(time.time() * 1000)
    users = [f"u{i}" for i in range(30)]
    core.process([ev(f"a-{u}", u, "timer.arm", now - 5000, delay=1000, n=1, key="k") for u in users])
    core.process([ev("b-u0", "u0", "timer.arm", now - 4000, delay=1000, n=2, key="k")])  # replaces u0's timer
    core.process([ev("far", "u1", "timer.arm", now, delay=3_600_000, n=9)])  # not due
    zsets = [group_prefix(kg) + "timers" for kg in range(KG)]
    assert sum(clean_redis.zcard(z) for z in zsets) == len(users) + 1
    # An orphan (a timer without its event, as a hand-edited Redis could leave) is removed, not fired; an event
    # that cannot be read is moved to playbus:rejected (neither holds the group's other timers back).
    clean_redis.zadd(zsets[0], {b"t-orphan": now - 10_000})
    clean_redis.zadd(zsets[1], {b"t-garbled": now - 10_000})
    clean_redis.hset(group_prefix(1) + "timer_events", b"t-garbled", b"\xc1 not msgpack")
    submitted: list[list[str]] = []

    async def submit(events: list[Any]) -> list[dict[str, Any]]:
        submitted.append([e.id for e in events])
        return core.process(events)

    async def scenario() -> TimerFirer:
        firer = TimerFirer(redis_server.url, list(range(KG)), submit, poll_s=0.02, chunk=7)
        stop = asyncio.Event()
        task = asyncio.create_task(firer.run(stop))
        await asyncio.sleep(1.0)
        stop.set()
        await task
        await firer.close()
        return firer

    firer = asyncio.run(scenario())
    ctx = {u: core.context("c1", u) for u in users}
    assert ctx["u0"] == {"fired": 1, "last": 2}
    assert all(c == {"fired": 1, "last": 1} for u, c in ctx.items() if u != "u0")
    ids = [i for chunk in submitted for i in chunk]
    assert len(ids) == len(set(ids)) == len(users), "a timer was submitted twice"
    assert all(len(chunk) <= 7 for chunk in submitted)
    assert firer.stats["fired"] == len(users) and firer.stats["stale"] == 0 and firer.stats["unreadable"] == 1
    [(_, rec)] = clean_redis.xrange("playbus:rejected")
    doc = json.loads(rec[b"rejected"])
    assert (doc["entry"], doc["partition"]) == ("t-garbled", 1) and "timer event cannot be read" in doc["reason"]
    assert sum(clean_redis.zcard(z) for z in zsets) == 1  # the one not due; the orphan is gone
    assert sum(clean_redis.hlen(group_prefix(kg) + "timer_events") for kg in range(KG)) == 1
    assert max(firer.lateness_ms) >= 3000  # these were due seconds before the firer started


def test_a_timers_key_of_the_wrong_type_fails_the_group_before_any_write(clean_redis: Any, config: Config,
                                                                         redis_server: RedisServer) -> None:
    core = ShardCore(config, 0, redis_server.url)
    now = int(time.time() * 1000)
    clean_redis.set(group_prefix(group("u5")) + "timers", "oops")
    with pytest.raises(StoreError, match="timers' holds a string"):
        core.process([ev("x1", "u5", "timer.arm", now, delay=1000, n=1)])
    assert clean_redis.hget(group_prefix(group("u5")) + "users", user_key("c1", "u5")) is None
    clean_redis.delete(group_prefix(group("u5")) + "timers")
    [res] = core.process([ev("x1", "u5", "timer.arm", now, delay=1000, n=1)])  # the retry lands
    assert res["status"] == "applied" and clean_redis.zcard(group_prefix(group("u5")) + "timers") == 1
