"""playbus on a Redis Cluster, end to end: `run_cluster.py --redis redis+cluster://127.0.0.1:PORT` on a cluster of
three masters the test creates. The main path of test_http_api.py (events over HTTP, a send and a later, stream
target deliveries through the outbox, the stream ingress, script push and activation, campaign stats), then an
exactly-once run with kill -9 of shard processes, and the live migration of a busy group's slot to another node
under traffic, both checked against a reference model. One run_cluster (one Ray) for the module.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.engine.keys import action_id, group_prefix, key_group, user_key
from playbus.actors.store.cluster_server import LocalRedisCluster
from playbus.actors.store.commit import REJECTED_STREAM
from playbus.actors.store.connect import connect
from playbus.client import StreamProducer
from playbus.loadtest.launcher import ClusterProcess, free_port
from tests.e2e.conftest import (
    CAMPAIGN,
    FIRST_QUIZ_V2,
    LOTTERY,
    OPS_TOKEN,
    PYTHON,
    ROOT,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    TOKEN,
    Playbus,
    _write_config,
    event,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

KG = 16  # the e2e config's key groups
SHARD_TITLE = "ray::_UserActivityActor"


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory, redis_cluster: LocalRedisCluster) -> Iterator[Playbus]:
    tmp = tmp_path_factory.mktemp("playbus-on-cluster")
    config_path = _write_config(tmp)
    cluster = ClusterProcess(config_path, port=free_port(), redis_dir=tmp / "unused", shards=2,
                             env={"PLAYBUS_ADMIN_TOKEN": TOKEN, "PLAYBUS_ADMIN_TOKENS": f"ops:{OPS_TOKEN}"},
                             cwd=ROOT, python=PYTHON, redis_url=redis_cluster.url,
                             start_timeout_s=START_TIMEOUT_S, stop_timeout_s=STOP_TIMEOUT_S)
    t = time.monotonic()
    cluster.start()
    print(f"\nplaybus on a Redis Cluster: up in {time.monotonic() - t:.1f} s at {cluster.url}", file=sys.stderr)
    yield Playbus(cluster, config_path)
    rep = cluster.stop()
    assert rep.exit_code == 0 and rep.stopped_line and not rep.timed_out, cluster.output()
    assert not rep.stragglers, f"processes of the cluster still running after stop: {rep.stragglers}"
    assert not (tmp / "unused").exists() or not any((tmp / "unused").iterdir())  # no embedded Redis was started


@pytest.fixture(scope="module")
def rc(redis_cluster: LocalRedisCluster) -> Iterator[Any]:
    client = connect(redis_cluster.url)
    yield client
    client.close()


def group(user: str) -> int:
    return key_group(user_key(CAMPAIGN, user), KG)


def users_in(prefix: str, groups: Callable[[int], bool], count: int) -> list[str]:
    out, i = [], 0
    while len(out) < count:
        u = f"{prefix}{i}"
        if groups(group(u)):
            out.append(u)
        i += 1
    return out


def results(pb: Playbus, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r = pb.post_events(events)
    assert r.status == 200, (r.status, r.body[:500])
    return r.json()["results"]  # type: ignore[no-any-return]


def post_until_ok(pb: Playbus, events: list[dict[str, Any]], attempts: int = 300) -> tuple[list[str], int]:
    """A retrying producer: the same events until answered 200 (503 while a shard restarts); (statuses, retries)."""
    for n in range(attempts):
        try:
            r = pb.post_events(events)
        except OSError:
            r = None
        if r is not None and r.status == 200:
            return [x["status"] for x in r.json()["results"]], n
        time.sleep(0.1)
    raise AssertionError(f"no 200 after {attempts} attempts")


def wait(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return got


def lottery(rc: Any) -> list[dict[str, Any]]:
    return [json.loads(f[b"action"]) for _, f in rc.xrange(LOTTERY)]


def outboxes_empty(rc: Any) -> bool:
    return all(rc.xlen(group_prefix(kg) + "outbox") == 0 for kg in range(KG))


# -- the main path ---------------------------------------------------------------------------------------------
def test_healthz_lists_every_shard_and_the_redis_is_the_cluster(pb: Playbus, redis_cluster: LocalRedisCluster) -> None:
    r = pb.request("GET", "/healthz")
    assert r.status == 200 and len(r.json()["shards"]) == 2, r.body
    assert pb.redis_url == redis_cluster.url
    assert not any("embedded redis-server" in line for line in pb.cluster.lines)


def test_events_are_applied_once_and_stream_grants_arrive_through_the_outbox(pb: Playbus, rc: Any) -> None:
    users = [users_in("q", lambda g, kg=kg: g == kg, 1)[0] for kg in range(KG)]  # one user in every group
    evs = [event(f"q-{u}", u) for u in users]
    first = results(pb, evs)
    assert [x["status"] for x in first] == ["applied"] * KG
    assert all(len(x["actions"]) == 1 for x in first)
    again = results(pb, evs)
    assert [x["status"] for x in again] == ["duplicate"] * KG and [x["actions"] for x in again] == \
        [x["actions"] for x in first]
    want = {x["actions"][0]["id"] for x in first}
    wait(lambda: want <= {a["id"] for a in lottery(rc)}, "the grants in the lottery stream")
    wait(lambda: outboxes_empty(rc), "the outboxes drained")
    got = [a["id"] for a in lottery(rc) if a["id"] in want]
    assert sorted(got) == sorted(want)  # each once
    assert pb.context(users[3]) == {"quiz.answered": 1}
    (d,) = pb.decisions(users[3])
    assert d["rule"] == "first_quiz" and d["actions"] == first[3]["actions"]


def test_a_send_and_a_later_reach_their_users_across_groups(pb: Playbus, rc: Any) -> None:
    inviter = "x-inv"
    helpers = users_in("x-h", lambda g: g != group(inviter), 2)
    assert rc.get_node_from_key(group_prefix(group(inviter))).name != "" and len(helpers) == 2
    helps = [event(f"x-help-{h}", h, "assist.helped", inviter=inviter) for h in helpers]
    assert [x["status"] for x in results(pb, helps)] == ["applied", "applied"]
    wait(lambda: pb.context(inviter).get("assist.credits") == 2, "the inviter's two credits")
    granted = [a for d in pb.decisions(inviter) for a in d["actions"]]
    assert [(a["type"], a["params"]) for a in granted] == [("lottery.grant_chance", {"chances": 2})]
    assert [x["status"] for x in results(pb, helps)] == ["duplicate", "duplicate"]
    far = 399 * 86_400_000
    results(pb, [event("x-acc-1", "x-t", "task.accepted", task="t1", within_ms=1000),
                 event("x-acc-2", "x-t", "task.accepted", task="t2", within_ms=far)])
    wait(lambda: pb.context("x-t").get("task.expired") == 1, "the past deadline's timer")
    r = pb.request("GET", f"/v1/campaigns/{CAMPAIGN}/users/x-t/context")
    assert [t["key"] for t in r.json()["timers"]] == ["task.t2"]
    results(pb, [event("x-done-2", "x-t", "task.completed", task="t2")])
    r = pb.request("GET", f"/v1/campaigns/{CAMPAIGN}/users/x-t/context")
    assert r.json()["timers"] == [] and r.json()["context"] == {"task.expired": 1, "task.done": 1}
    time.sleep(0.5)
    assert pb.context(inviter)["assist.credits"] == 2  # no credit twice


def test_the_stream_ingress_on_a_cluster_and_its_rejections(pb: Playbus, rc: Any) -> None:
    users = [f"s-{i}" for i in range(20)]
    StreamProducer(rc).send_many([event(f"s-{u}-{n}", u, "checkin.checked_in") for u in users for n in range(3)])
    rc.xadd("playbus:in", {"event": json.dumps(event("s-in-1", "s-in", "checkin.checked_in"))})
    rc.xadd("playbus:in", {"event": b"{not json"})
    rc.xadd(group_prefix(0) + "in", {"events": b"not msgpack"})
    wait(lambda: all(pb.context(u).get("checkin.count") == 3 for u in users), "the partitions' events")
    wait(lambda: pb.context("s-in").get("checkin.count") == 1, "playbus:in's event")
    reasons = wait(lambda: (rs := [json.loads(f[b"rejected"])["reason"] for _, f in rc.xrange(REJECTED_STREAM)])
                   and len(rs) >= 2 and rs, "two rejection records")
    assert any(r.startswith("event is neither JSON nor msgpack") for r in reasons)
    assert any("msgpack array" in r for r in reasons)


def test_a_pushed_script_version_is_activated_on_every_shard(pb: Playbus) -> None:
    r = pb.admin("PUT", "/v1/scripts/first_quiz", FIRST_QUIZ_V2)
    assert r.status == 201 and r.json()["version"] == 2, r.body
    probes = [users_in("v", lambda g, s=s: (g < KG // 2) == (s == 0), 1)[0] for s in range(2)]
    try:
        assert pb.admin("POST", "/v1/scripts/first_quiz/activate", {"version": 2}).status == 200
        got = results(pb, [event(f"v-{u}", u) for u in probes])
        assert [x["actions"][0]["script_version"] for x in got] == [2, 2]
        assert all(pb.context(u) == {"quiz.answered": 1, "quiz.script": "v2"} for u in probes)
    finally:
        assert pb.admin("POST", "/v1/scripts/first_quiz/activate", {"version": 1}).status == 200
    doc = pb.admin("GET", "/v1/scripts/first_quiz").json()
    assert doc["active"] == 1 and doc["versions"] == [1, 2]


def test_campaign_stats_count_the_grants_and_a_top_up_raises_the_budget(pb: Playbus, rc: Any) -> None:
    wait(lambda: outboxes_empty(rc), "the outboxes drained")
    stats = pb.admin("GET", f"/v1/campaigns/{CAMPAIGN}/stats").json()
    granted = [a for a in lottery(rc) if a["type"] == "lottery.grant_chance"]
    assert stats["grants"]["lottery.grant_chance"] == len(granted)
    budget = stats["budgets"]["chances"]
    assert budget["spent"] == sum(a["params"]["chances"] for a in granted)
    assert budget["spent"] + budget["left"] == budget["total"] == 1_000_000
    assert stats["delivery"] == {"backlog": 0, "dead": 0, "exact": True}
    r = pb.admin("POST", f"/v1/campaigns/{CAMPAIGN}/budgets/chances/topup", {"amount": 500})
    assert r.status == 200 and r.json()["total"] == 1_000_500
    assert [e["action"] for e in pb.admin("GET", "/v1/audit?limit=1").json()["entries"]] == ["budget.topup"]


# -- exactly once through kill -9, and through a slot migration --------------------------------------------------
class Model:
    """What the events sent must have done: check-ins per user, credits per inviter, one first_quiz grant per user
    who answered (caused by one of its answers: which one came first depends on the producers' interleaving), and
    one `credited` grant per inviter credited twice or more."""

    def __init__(self) -> None:
        self.checkins: Counter[str] = Counter()
        self.credits: Counter[str] = Counter()
        self.quizzes: dict[str, set[str]] = {}

    def plan(self, rng: random.Random, prefix: str, users: list[str], inviters: list[str], batches: int,
             size: int) -> list[list[dict[str, Any]]]:
        out = []
        for b in range(batches):
            batch = []
            for j in range(size):
                u, eid = rng.choice(users), f"{prefix}-{b}-{j}"
                kind = rng.random()
                if kind < 0.6:
                    batch.append(event(eid, u, "checkin.checked_in"))
                    self.checkins[u] += 1
                elif kind < 0.85:
                    inv = rng.choice(inviters)
                    batch.append(event(eid, u, "assist.helped", inviter=inv))
                    self.credits[inv] += 1
                else:
                    batch.append(event(eid, u))
                    self.quizzes.setdefault(u, set()).add(eid)
            out.append(batch)
        return out

    def check(self, pb: Playbus, rc: Any, users: list[str], inviters: list[str]) -> None:
        wait(lambda: outboxes_empty(rc), "the outboxes drained", 60)

        def settled() -> bool:
            return all(pb.context(i).get("assist.credits", 0) >= self.credits[i] for i in inviters)

        wait(settled, "every credit", 60)
        time.sleep(0.5)
        ctx = {u: pb.context(u) for u in set(users) | set(inviters)}
        assert {u: ctx[u].get("checkin.count", 0) for u in users} == {u: self.checkins[u] for u in users}
        assert {i: ctx[i].get("assist.credits", 0) for i in inviters} == {i: self.credits[i] for i in inviters}
        actions = lottery(rc)
        doubled = [i for i, n in Counter(a["id"] for a in actions).items() if n > 1]
        assert doubled == [], f"{len(doubled)} stream actions landed twice"
        mine = set(users) | set(inviters)
        quizzes = [a for a in actions if a["user"] in mine and a["rule"] == "first_quiz"]
        assert Counter(a["user"] for a in quizzes) == Counter(set(self.quizzes)), "a first_quiz grant lost or doubled"
        quiz = {a["user"]: a for a in quizzes}
        assert all(a["cause"] in self.quizzes[u] and a["id"] == action_id(CAMPAIGN, u, a["cause"], "first_quiz", 0)
                   for u, a in quiz.items())
        credited = Counter(a["user"] for a in actions if a["user"] in mine and a["rule"] == "credited")
        assert credited == Counter(i for i in inviters if self.credits[i] >= 2)


def run_producers(pb: Playbus, plans: list[list[list[dict[str, Any]]]], progress: dict[str, int]) -> list[str]:
    """Each plan posted batch by batch by its own thread, every batch retried until 200; every status seen."""
    seen: list[str] = []
    errors: list[BaseException] = []

    def produce(plan: list[list[dict[str, Any]]]) -> None:
        try:
            for batch in plan:
                t = time.monotonic()
                statuses, retries = post_until_ok(pb, batch)
                progress["slowest_ms"] = max(progress.get("slowest_ms", 0), int((time.monotonic() - t) * 1000))
                seen.extend(statuses)
                progress["answered"] += 1
                progress["retried"] += retries
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    return seen


def test_kill_9_of_shard_processes_under_load_loses_nothing_and_applies_nothing_twice(pb: Playbus, rc: Any) -> None:
    rng = random.Random(11)
    users = [f"k{i}" for i in range(40)]
    inviters = [f"k-inv-{i}" for i in range(4)]
    model = Model()
    plans = [model.plan(rng, f"k{p}", users, inviters, 24, 25) for p in range(3)]
    total = sum(len(p) for p in plans)
    progress = {"answered": 0, "retried": 0}
    killed: list[int] = []

    def killer() -> None:
        for at in (total // 6, total // 2, 5 * total // 6):
            while progress["answered"] < at:
                time.sleep(0.01)
            pids = pb.cluster.processes(SHARD_TITLE)
            assert pids, "no shard process found"
            pid = random.Random(at).choice(pids)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            wait(lambda p=pid: p not in pb.cluster.processes(SHARD_TITLE) and
                 len(pb.cluster.processes(SHARD_TITLE)) == 2, "the killed shard's restart", 60)

    k = threading.Thread(target=killer)
    k.start()
    seen = run_producers(pb, plans, progress)
    k.join(120)
    assert len(killed) == 3 and progress["answered"] == total
    assert set(seen) <= {"applied", "duplicate"}
    # The whole load again (a producer's retry storm): every id is a duplicate now.
    assert set(run_producers(pb, plans, {"answered": 0, "retried": 0})) == {"duplicate"}
    model.check(pb, rc, users, inviters)
    # Requests in flight at a kill waited for the restart (the ingress retries the shard call).
    assert progress["slowest_ms"] >= 300, progress
    print(f"kill -9 on a Redis Cluster: {len(killed)} shard kills, {progress['retried']} requests re-sent, "
          f"slowest request {progress['slowest_ms']} ms", file=sys.stderr)


def test_a_busy_groups_slot_migrates_to_another_node_under_traffic_with_nothing_lost_or_doubled(
        pb: Playbus, rc: Any, redis_cluster: LocalRedisCluster) -> None:
    hot = group("m-hot")
    users = users_in("m", lambda g: g == hot, 12) + users_in("m-o", lambda g: g != hot, 12)
    inviters = users_in("m-inv", lambda g: g == hot, 2) + users_in("m-inv-o", lambda g: g != hot, 1)
    model = Model()
    rng = random.Random(5)
    plans = [model.plan(rng, f"m{p}", users, inviters, 30, 20) for p in range(2)]
    # Beside HTTP, a bulk producer writes record batches into the hot group's partition during the move.
    streamed = [event(f"m-st-{n}", users[n % 6], "checkin.checked_in") for n in range(300)]
    for e in streamed:
        model.checkins[e["user"]] += 1
    slot = rc.keyslot(group_prefix(hot) + "users")
    src = redis_cluster.owner(slot)
    dst = (src + 1) % 3
    progress = {"answered": 0, "retried": 0}
    moved: dict[str, Any] = {}

    def mover() -> None:
        while progress["answered"] < 10:
            time.sleep(0.01)
        t = time.monotonic()
        moved["keys"] = redis_cluster.move_slot(slot, dst, batch=1, pause_s=0.3)
        moved["s"] = time.monotonic() - t

    def bulk() -> None:
        producer = StreamProducer(connect(redis_cluster.url), key_groups=KG, batch=10)
        for i in range(0, len(streamed), 10):
            producer.send_many(streamed[i:i + 10])
            time.sleep(0.05)

    threads = [threading.Thread(target=mover), threading.Thread(target=bulk)]
    for t in threads:
        t.start()
    seen = run_producers(pb, plans, progress)
    for t in threads:
        t.join(120)
    assert moved.get("keys", 0) >= 5, moved  # users, journal, input, offset, outbox, ... moved one by one
    assert redis_cluster.owner(slot) == dst
    assert set(seen) <= {"applied", "duplicate"}
    model.check(pb, rc, users, inviters)
    r = pb.request("GET", "/healthz")
    assert r.status == 200, r.body
    print(f"slot {slot} (group {hot}) moved from node {src} to {dst}: {moved['keys']} keys in {moved['s']:.1f} s "
          f"under traffic; {progress['retried']} requests re-sent, slowest request {progress['slowest_ms']} ms",
          file=sys.stderr)


def test_the_cluster_run_left_no_embedded_redis(pb: Playbus) -> None:
    assert Path(pb.cluster.config_path).exists() and pb.cluster.redis_pids() == []
