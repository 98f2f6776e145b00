"""The cluster against a real Redis and real Ray shard actors: the HTTP contract through IngressCore, and
exactly-once through cluster restarts, kill -9 of shard processes, Redis restarts, concurrency and zombies.

One Ray session for the module; each test gets fresh shards on an emptied Redis (AOF, appendfsync always).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import ray
from ray.exceptions import RayActorError

from playbus.actors.edge.serve_app import call_with_retry
from playbus.actors.engine.keys import action_id
from playbus.actors.service.http_api import MAX_EVENTS
from playbus.actors.service.router import Router
from playbus.actors.service.shard import ShardCore
from playbus.actors.store.commit import RedisStore
from playbus.actors.store.errors import FencedError
from playbus.actors.store.leases import budget_key
from playbus.actors.store.server import RedisServer
from playbus.config.schema import Config
from tests.integration.cluster_helpers import (
    CAMPAIGN,
    CAP_PER_DAY,
    CASH_TOTAL,
    DAY,
    JSON,
    MSGPACK,
    T0,
    Cluster,
    context_of,
    event,
    failed_runs,
    make_cluster_config,
    outbox_actions,
    post,
    post_until_ok,
    redis_fingerprint,
    statuses,
    stream_actions,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This module's own Redis: AOF with appendfsync always, so a SIGKILLed Redis keeps every commit."""
    server = RedisServer(tmp_path_factory.mktemp("redis-aof"), appendfsync="always")
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return make_cluster_config(tmp_path_factory.mktemp("cluster-config"))


def users_on_shard(shard: int, count: int, prefix: str) -> list[str]:
    router = Router(2, 16)
    found = [u for u in (f"{prefix}{i}" for i in range(1000)) if router.shard_of(CAMPAIGN, u) == shard]
    return found[:count]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- 1. the HTTP contract ------------------------------------------------------------------------------
def test_http_events_context_decisions_and_errors_end_to_end(cluster: Cluster, redis_client: Any) -> None:
    core = cluster.core
    assert core is not None
    a, c, e = users_on_shard(0, 3, "h")
    b, d, f = users_on_shard(1, 3, "h")

    def quiz(eid: str, user: str) -> dict[str, Any]:
        return event(eid, user, "quiz.answered", correct=True)

    def chance(eid: str, user: str) -> dict[str, Any]:
        return {"id": action_id(CAMPAIGN, user, eid, "first_quiz", 0), "type": "lottery.grant_chance",
                "campaign": CAMPAIGN, "user": user, "params": {"chances": 1}, "cause": eid,
                "rule": "first_quiz", "script_version": 1}

    async def scenario() -> None:
        # JSON: interleaved shards, a malformed and an unknown-campaign event, a repeat inside the request.
        st, doc = await post(core, [
            quiz("e1", a), quiz("e2", b),
            {"id": "bad1", "campaign": CAMPAIGN, "type": "quiz.answered"},
            quiz("e1", a),
            {"id": "bad2", "campaign": "nope", "user": a, "type": "quiz.answered"},
            quiz("e3", c),
        ], "json")
        assert st == 200
        res = doc["results"]
        assert [r["id"] for r in res] == ["e1", "e2", "bad1", "e1", "bad2", "e3"]
        assert statuses(res) == ["applied", "applied", "rejected", "duplicate", "rejected", "applied"]
        assert res[0]["actions"] == [chance("e1", a)] and res[0]["errors"] == []
        assert res[1]["actions"] == [chance("e2", b)]
        assert res[2]["errors"] and "user" in res[2]["errors"][0]
        assert res[3]["actions"] == [chance("e1", a)]  # a retry shows what its first processing granted
        assert res[4]["actions"] == []
        assert "unknown campaign" in res[4]["errors"][0]
        assert res[5]["actions"] == [chance("e3", c)]

        # msgpack: a second answer (no new chance), retried ids, a new user on the other shard.
        st, doc = await post(core, [quiz("e4", b), quiz("e1", a), quiz("e2", b), quiz("e5", d)], "msgpack")
        assert st == 200
        res = doc["results"]
        assert statuses(res) == ["applied", "duplicate", "duplicate", "applied"]
        assert res[0]["actions"] == [] and res[1]["actions"] == [chance("e1", a)]
        assert res[2]["actions"] == [chance("e2", b)]  # from the journal: decided in an earlier batch
        assert res[3]["actions"] == [chance("e5", d)]

        # The stream target holds each granted action exactly once, as answered.
        landed = stream_actions(redis_client)
        assert sorted(landed, key=lambda x: x["id"]) == sorted(
            [chance("e1", a), chance("e2", b), chance("e3", c), chance("e5", d)], key=lambda x: x["id"])

        assert await context_of(core, b) == {"quiz.answered": 2}
        assert await context_of(core, a) == {"quiz.answered": 1}
        assert await context_of(core, "never-seen") == {}

        path = f"/v1/campaigns/{CAMPAIGN}/users/{b}/decisions"
        st, _, body = await core.handle("GET", path, "limit=1", {}, b"")
        assert st == 200
        decisions = json.loads(body)["decisions"]
        assert [x["event"] for x in decisions] == ["e4"]
        assert decisions[0]["rule"] == "first_quiz" and decisions[0]["script_version"] == 1
        assert decisions[0]["actions"] == [] and decisions[0]["error"] is None
        assert decisions[0]["changes"] == {"quiz.answered": 2}
        st, _, body = await core.handle("GET", path, "limit=10", {}, b"")
        decisions = json.loads(body)["decisions"]
        assert [x["event"] for x in decisions] == ["e4", "e2"]  # newest first, no more than there are
        assert decisions[1]["actions"] == [chance("e2", b)]
        st, _, body = await core.handle("GET", path, "", {}, b"")
        assert [x["event"] for x in json.loads(body)["decisions"]] == ["e4", "e2"]

        st, _, body = await core.handle("GET", "/healthz", "", {}, b"")
        health = json.loads(body)
        assert st == 200 and health["ok"] is True
        assert sorted(s["shard"] for s in health["shards"]) == [0, 1]

        # Unparseable bodies are 400, too many events 413; neither processes anything.
        assert (await core.handle("POST", "/v1/events", "", JSON, b"{bad"))[0] == 400
        assert (await core.handle("POST", "/v1/events", "", MSGPACK, b"\xc1"))[0] == 400
        big = [quiz(f"big{i}", f"bu{i}") for i in range(MAX_EVENTS + 1)]
        assert (await core.handle("POST", "/v1/events", "", JSON, json.dumps(big).encode()))[0] == 413
        assert (await core.handle("POST", "/v1/events", "", MSGPACK, msgpack.packb(big)))[0] == 413
        st, doc = await post(core, big[:3])
        assert statuses(doc["results"]) == ["applied"] * 3  # not seen before: the 413s applied nothing
        st, doc = await post(core, big[:MAX_EVENTS])  # exactly the limit is accepted
        assert st == 200
        assert statuses(doc["results"]) == ["duplicate"] * 3 + ["applied"] * (MAX_EVENTS - 3)

        # A hostile script (endless loop) fails its own rule only; the shard keeps serving.
        before = len(stream_actions(redis_client))
        st, doc = await post(core, [event("x1", e, "evil.loop"), quiz("e6", f), event("x2", c, "evil.loop")])
        assert st == 200
        res = doc["results"]
        assert statuses(res) == ["applied", "applied", "applied"]
        for r in (res[0], res[2]):
            assert r["actions"] == []
            assert len(r["errors"]) == 1
            assert r["errors"][0].startswith("rule loop_forever:") and "instruction budget" in r["errors"][0]
        assert res[1]["actions"] == [chance("e6", f)] and res[1]["errors"] == []
        assert await context_of(core, e) == {"evil.count": 1}  # its writes discarded, the other rule's kept
        assert await context_of(core, c) == {"quiz.answered": 1, "evil.count": 1}
        assert [x["id"] for x in stream_actions(redis_client)[before:]] == [chance("e6", f)["id"]]
        failed = failed_runs(redis_client, 16)
        assert sorted((x["event"]["id"], x["rule"]) for x in failed) == [("x1", "loop_forever"),
                                                                         ("x2", "loop_forever")]
        st, _, body = await core.handle("GET", f"/v1/campaigns/{CAMPAIGN}/users/{e}/decisions", "", {}, b"")
        journal = json.loads(body)["decisions"]
        assert [(x["rule"], x["error"] is None) for x in journal] == [("count_evil", True), ("loop_forever", False)]
        st, doc = await post(core, [quiz("e7", e), quiz("e8", f)])
        assert statuses(doc["results"]) == ["applied", "applied"]
        assert (await core.handle("GET", "/healthz", "", {}, b""))[0] == 200

    run(scenario())


# -- 2. cluster restart --------------------------------------------------------------------------------
def test_cluster_restart_keeps_context_and_dedup(cluster: Cluster, redis_client: Any) -> None:
    users = [f"r{i}" for i in range(12)]
    first = [event(f"r-a{n}-{u}", u, lottery=n == 1) for n in range(3) for u in users]
    second = [event(f"r-b{n}-{u}", u, lottery=n == 0) for n in range(2) for u in users]
    expected = {action_id(CAMPAIGN, x["user"], x["id"], "tick", 0) for x in first + second if x["data"]["lottery"]}
    granted: dict[str, list[Any]] = {}

    async def before() -> None:
        assert cluster.core is not None
        st, doc = await post(cluster.core, first)
        assert st == 200 and statuses(doc["results"]) == ["applied"] * len(first)
        granted.update({r["id"]: r["actions"] for r in doc["results"]})
        assert [await context_of(cluster.core, u) for u in users] == [{"tick.count": 3}] * len(users)

    run(before())
    old = list(cluster.shards)
    core = cluster.restart()
    for s in old:  # the old shard actors are gone for good
        with pytest.raises(RayActorError):
            ray.get(s.health.remote(), timeout=10)

    async def after() -> None:
        st, doc = await post(core, first, "msgpack")
        assert st == 200 and statuses(doc["results"]) == ["duplicate"] * len(first)
        assert all(r["actions"] == granted[r["id"]] for r in doc["results"])  # across the restart, from Redis
        assert any(r["actions"] for r in doc["results"])
        st, doc = await post(core, second, "msgpack")
        assert st == 200 and statuses(doc["results"]) == ["applied"] * len(second)
        assert [await context_of(core, u) for u in users] == [{"tick.count": 5}] * len(users)
        router = Router(2, 16)  # the new shards' memory continued from Redis, too
        for u in users:
            assert await call_with_retry(cluster.shards[router.shard_of(CAMPAIGN, u)], "context",
                                         (CAMPAIGN, u)) == {"tick.count": 5}
        ids = [x["id"] for x in stream_actions(redis_client)]
        assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))

    run(after())


# -- 3. kill -9 under load -----------------------------------------------------------------------------
class _RetryCount(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("shard call process failed") and "retrying" in record.getMessage():
            self.count += 1


def test_kill_9_of_shard_processes_under_load_loses_nothing_and_applies_nothing_twice(
    cluster: Cluster, redis_client: Any
) -> None:
    core = cluster.core
    assert core is not None
    rng = random.Random(3)
    users = [f"k{i}" for i in range(48)]
    producers, per_producer, size, every = 4, 20, 50, 7
    plan: list[list[list[dict[str, Any]]]] = []
    want_count: Counter[str] = Counter()
    want_actions: set[str] = set()
    seq = 0
    for p in range(producers):
        mine = []
        for b in range(per_producer):
            batch = []
            for j in range(size):
                user, eid = rng.choice(users), f"p{p}-b{b}-e{j}"
                lottery = seq % every == 0
                seq += 1
                batch.append(event(eid, user, lottery=True) if lottery else event(eid, user))
                want_count[user] += 1
                if lottery:
                    want_actions.add(action_id(CAMPAIGN, user, eid, "tick", 0))
            mine.append(batch)
        plan.append(mine)
    total = producers * per_producer
    kills = [(0, total // 8), (1, 3 * total // 8), (0, 5 * total // 8)]
    answers: dict[str, list[str]] = defaultdict(list)
    progress = {"answered": 0, "failed": 0}
    killed: list[tuple[int, int, int]] = []

    async def producer(batches: list[list[dict[str, Any]]]) -> None:
        for batch in batches:
            results, failures = await post_until_ok(core, batch)
            progress["failed"] += failures
            assert [r["id"] for r in results] == [x["id"] for x in batch]
            for r in results:
                answers[r["id"]].append(r["status"])
            progress["answered"] += 1

    async def killer() -> None:
        for shard, at in kills:
            pid = await cluster.pid(shard)
            while progress["answered"] < at:
                await asyncio.sleep(0.002)
            os.kill(pid, signal.SIGKILL)
            new = await cluster.pid(shard)  # Ray restarts it (max_restarts=-1)
            killed.append((shard, pid, new))

    counter = _RetryCount()
    log = logging.getLogger("playbus.ingress")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(counter)
    try:
        async def scenario() -> None:
            await asyncio.gather(killer(), *(producer(batches) for batches in plan))

        run(scenario())
    finally:
        log.removeHandler(counter)
        log.setLevel(level)

    assert len(killed) == len(kills) and all(old != new for _, old, new in killed)
    assert progress["answered"] == total
    # The kills hit calls in flight: some shard calls failed and were retried.
    assert counter.count + progress["failed"] >= 1

    all_ids = {x["id"] for batches in plan for batch in batches for x in batch}
    assert set(answers) == all_ids
    assert all(len(s) == 1 and s[0] in ("applied", "duplicate") for s in answers.values())
    applied = {i: s.count("applied") for i, s in answers.items()}
    assert max(applied.values()) == 1, "an event was answered 'applied' twice"
    # An id never answered 'applied' was committed by a shard killed before it could answer; its retry
    # said 'duplicate'. The counters below prove it was applied (once).
    only_duplicate = [i for i, n in applied.items() if n == 0]
    assert len(only_duplicate) <= len(kills) * producers * size
    print(f"kill -9: {len(killed)} kills, {counter.count} shard calls retried, {progress['failed']} requests"
          f" re-sent, {len(only_duplicate)} events committed by a killed shard before it answered")

    async def committed() -> dict[str, int]:
        return {u: (await context_of(core, u)).get("tick.count", 0) for u in users}

    # Every producer re-sends everything (a retry storm after the crashes): all of it is a duplicate.
    async def resend(batches: list[list[dict[str, Any]]]) -> list[str]:
        return [st for batch in batches for st in statuses((await post_until_ok(core, batch))[0])]

    async def storm() -> list[list[str]]:
        return await asyncio.gather(*(resend(batches) for batches in plan))

    assert {st for sts in run(storm()) for st in sts} == {"duplicate"}

    counts = run(committed())
    assert counts == dict(want_count), "lost or doubly applied events"
    assert sum(counts.values()) == producers * per_producer * size
    ids = [x["id"] for x in stream_actions(redis_client)]
    dup = [i for i, n in Counter(ids).items() if n > 1]
    assert dup == [], f"{len(dup)} actions landed twice"
    assert set(ids) == want_actions and len(ids) == len(want_actions)


# -- 4. Redis restart ----------------------------------------------------------------------------------
def test_redis_restart_with_aof_keeps_context_and_dedup(
    cluster: Cluster, redis_server: RedisServer, redis_client: Any
) -> None:
    core = cluster.core
    assert core is not None
    users = [f"d{i}" for i in range(10)]

    def batch(tag: str, lottery_user: int) -> list[dict[str, Any]]:
        return [event(f"{tag}-{u}", u, lottery=i == lottery_user) for i, u in enumerate(users)]

    a, b, c = batch("A", 1), batch("B", 2), batch("C", 3)
    expected = {action_id(CAMPAIGN, x["user"], x["id"], "tick", 0) for x in a + b + c if x["data"]["lottery"]}

    async def scenario() -> None:
        res, _ = await post_until_ok(core, a)
        assert statuses(res) == ["applied"] * len(a)

        redis_server.restart()  # clean stop (SIGTERM) and start on the same port: data back from the AOF
        res, _ = await post_until_ok(core, a)  # the shards reconnect; a failed attempt is retried
        assert statuses(res) == ["duplicate"] * len(a)
        res, failures = await post_until_ok(core, b)
        print(f"redis restart: {failures} failed attempts before the first batch after it")
        if failures == 0:
            assert statuses(res) == ["applied"] * len(b)
        else:  # an attempt may have failed after some groups committed: those ids are now duplicates
            assert set(statuses(res)) <= {"applied", "duplicate"}
        assert [await context_of(core, u) for u in users] == [{"tick.count": 2}] * len(users)

        redis_server.kill()  # a crash of redis-server: what it wrote survives (fsync itself: test_durability.py)
        redis_server.start()
        res, _ = await post_until_ok(core, b)
        assert statuses(res) == ["duplicate"] * len(b)
        res, _ = await post_until_ok(core, c)
        assert set(statuses(res)) <= {"applied", "duplicate"}
        assert [await context_of(core, u) for u in users] == [{"tick.count": 3}] * len(users)
        st, _, _ = await core.handle("GET", "/healthz", "", {}, b"")
        assert st == 200
        ids = [x["id"] for x in stream_actions(redis_client)]
        assert sorted(ids) == sorted(expected)

    run(scenario())


# -- 5. caps and the shared budget ---------------------------------------------------------------------
def test_caps_and_shared_budget_hold_under_concurrent_load(
    cluster: Cluster, config: Config, redis_client: Any
) -> None:
    core = cluster.core
    assert core is not None
    hot = [f"hot{i}" for i in range(4)]  # many concurrent requests for the same users
    wide = [f"w{i}" for i in range(120)]  # many users across both shards
    cents = [10, 20, 50, 30]
    days: list[list[dict[str, Any]]] = []
    for day in range(2):
        days.append([event(f"t{day}-{u}-{n}", u, "task.completed", ts=T0 + day * DAY + n * 1000,
                           cents=cents[(n + day) % len(cents)])
                     for u in hot + wide for n in range(40 if u in hot else 6)])
        random.Random(5 + day).shuffle(days[-1])
    events = days[0] + days[1]
    demand = sum(x["data"]["cents"] for x in events)
    assert demand > 2 * CASH_TOTAL
    by_id = {x["id"]: x for x in events}
    assert {Router(2, 16).shard_of(CAMPAIGN, u) for u in hot + wide} == {0, 1}

    async def scenario() -> list[Any]:
        # One day after the other (see the interleaved-days test below), each as concurrent requests.
        replies: list[Any] = []
        for evs in days:
            requests = [evs[i:i + 40] for i in range(0, len(evs), 40)]
            replies += await asyncio.gather(*(post(core, r, "json" if i % 2 else "msgpack")
                                              for i, r in enumerate(requests)))
        return replies

    replies = run(scenario())
    results = [r for st, doc in replies for r in doc["results"]]
    assert [st for st, _ in replies] == [200] * len(replies)
    assert statuses(results) == ["applied"] * len(events)

    def user_day(action: dict[str, Any]) -> tuple[str, int]:
        cause = by_id[action["cause"]]  # ids are "t<day>-<user>-<n>"; the days are 24 h apart
        return cause["user"], int(cause["id"].split("-", 1)[0][1:])

    granted = [a for r in results for a in r["actions"]]
    chances = [a for a in granted if a["type"] == "lottery.grant_chance"]
    cash = [a for a in granted if a["type"] == "wallet.grant_cash"]
    # Every user asked for more than the cap on both days: exactly the cap, per user and day.
    per_day = Counter(user_day(a) for a in chances)
    assert len(per_day) == 2 * len(hot + wide)
    assert set(per_day.values()) == {CAP_PER_DAY}
    landed = stream_actions(redis_client)
    assert Counter(user_day(a) for a in landed) == per_day
    assert sorted(a["id"] for a in landed) == sorted(a["id"] for a in chances)

    spent = sum(a["params"]["amount_cents"] for a in cash)
    print(f"budget: {spent} of {CASH_TOTAL} granted, demand {demand}")
    assert spent <= CASH_TOTAL
    assert spent >= 0.97 * CASH_TOTAL, f"only {spent} of {CASH_TOTAL} granted while demand was {demand}"
    outbox = outbox_actions(redis_client, config.key_groups)
    assert sorted(a["id"] for a in outbox) == sorted(a["id"] for a in cash)

    async def close() -> None:
        await asyncio.gather(*(call_with_retry(s, "close", ()) for s in cluster.shards))

    run(close())  # the shards give their unused leases back: nothing was created or lost
    assert int(redis_client.get(budget_key(CAMPAIGN, "cash"))) + spent == CASH_TOTAL


def test_caps_hold_when_events_of_two_days_interleave(cluster: Cluster, redis_client: Any) -> None:
    """Events do not arrive in `ts` order (queues, retries, late producers around midnight): a user's
    per-day cap must hold for every day, whatever the order in which that user's days alternate."""
    core = cluster.core
    assert core is not None
    users = users_on_shard(0, 3, "i") + users_on_shard(1, 3, "i")
    events = [event(f"i{n}-{u}", u, "task.completed", ts=T0 + (n % 2) * DAY + n * 1000, cents=10)
              for n in range(12) for u in users]  # day 0, day 1, day 0, ... for every user

    async def scenario() -> list[Any]:
        out = []
        for i in range(0, len(events), 6):  # one step of every user per request, in order
            st, doc = await post(core, events[i:i + 6])
            assert st == 200
            out += doc["results"]
        return out

    results = run(scenario())
    assert statuses(results) == ["applied"] * len(events)
    chances = Counter((a["user"], int(a["cause"].split("-", 1)[0][1:]) % 2)
                      for r in results for a in r["actions"] if a["type"] == "lottery.grant_chance")
    assert chances == {(u, day): CAP_PER_DAY for u in users for day in (0, 1)}
    assert len(stream_actions(redis_client)) == sum(chances.values())


# -- 6. fencing ----------------------------------------------------------------------------------------
def test_zombie_shard_is_fenced_and_writes_nothing(config: Config, redis_server: RedisServer,
                                                   clean_redis: Any) -> None:
    users = users_on_shard(0, 8, "z")
    store = RedisStore(clean_redis, config.key_groups)
    groups = sorted({store.group_of(f"{CAMPAIGN}\x00{u}") for u in users})

    def batch(tag: str) -> list[dict[str, Any]]:
        return [event(f"{tag}-{u}", u, lottery=True) for u in users]

    zombie = ShardCore(config, 0, redis_server.url)
    try:
        assert statuses(zombie.process(batch("one"))) == ["applied"] * len(users)
        owner = ShardCore(config, 0, redis_server.url)  # a restart elsewhere: claims newer epochs
        try:
            assert all(owner.epochs[g] > zombie.epochs[g] for g in zombie.epochs)
            before = redis_fingerprint(clean_redis)
            with pytest.raises(FencedError) as err:
                zombie.process(batch("two"))
            assert sorted(err.value.group_list) == groups  # every group the batch touched
            assert redis_fingerprint(clean_redis) == before, "a fenced zombie wrote to Redis"
            health = zombie.health()
            assert not health["ok"] and any(p.startswith("fenced") for p in health["problems"])
            with pytest.raises(FencedError):
                zombie.process(batch("three"))
            assert redis_fingerprint(clean_redis) == before

            # The owner sees none of the zombie's work: "two" is new to it, "one" a duplicate.
            assert statuses(owner.process(batch("one"))) == ["duplicate"] * len(users)
            assert statuses(owner.process(batch("two"))) == ["applied"] * len(users)
            assert [owner.context(CAMPAIGN, u) for u in users] == [{"tick.count": 2}] * len(users)
            ids = [x["id"] for x in stream_actions(clean_redis)]
            expected = {action_id(CAMPAIGN, u, f"{t}-{u}", "tick", 0) for t in ("one", "two") for u in users}
            assert sorted(ids) == sorted(expected)
        finally:
            owner.close()
    finally:
        zombie.close()



# -- 7. supervision --------------------------------------------------------------------------------------------
def test_a_fenced_shard_exits_ray_restarts_it_and_it_serves_again(cluster: Cluster, redis_client: Any) -> None:
    core = cluster.core
    assert core is not None
    users = users_on_shard(1, 4, "f")
    groups = sorted({RedisStore(redis_client, 16).group_of(f"{CAMPAIGN}\x00{u}") for u in users})

    async def scenario() -> None:
        res, _ = await post_until_ok(core, [event(f"f1-{u}", u) for u in users])
        assert statuses(res) == ["applied"] * len(users)
        before = await cluster.pid(1)
        RedisStore(redis_client, 16).claim(groups)  # another owner claims the groups: shard 1 is now a zombie
        res, failures = await post_until_ok(core, [event(f"f2-{u}", u) for u in users])
        assert failures >= 1  # the fenced batch failed; its retry reached the restarted shard
        assert set(statuses(res)) <= {"applied"} and len(res) == len(users)
        after = await cluster.pid(1)
        assert after != before, "the fenced shard did not exit"
        assert [await context_of(core, u) for u in users] == [{"tick.count": 2}] * len(users)

    run(scenario())


def test_healthz_is_503_with_every_shard_listed_while_a_shard_cannot_commit(cluster: Cluster,
                                                                          redis_client: Any) -> None:
    core = cluster.core
    assert core is not None

    async def scenario() -> None:
        used = int(redis_client.info("memory")["used_memory"])
        redis_client.config_set("maxmemory", used + 1024)  # writes refused: commits fail
        try:
            st, _ = await post(core, [event("h-oom", "h-oom-user")])
            assert st == 503
            st, headers, body = await core.handle("GET", "/healthz", "", {}, b"")
            doc = json.loads(body)
            assert st == 503 and headers.get("retry-after") == "1"
            assert doc["ok"] is False and len(doc["shards"]) == 2
            sick = [s for s in doc["shards"] if not s["ok"]]
            assert sick and any("cannot commit" in p for s in sick for p in s["problems"])
        finally:
            redis_client.config_set("maxmemory", 0)
        res, _ = await post_until_ok(core, [event("h-oom", "h-oom-user")])
        assert statuses(res) == ["applied"]
        st, _, body = await core.handle("GET", "/healthz", "", {}, b"")
        assert st == 200 and json.loads(body)["ok"] is True

    run(scenario())
