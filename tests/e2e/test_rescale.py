"""Rescaling a running cluster under load, as an operator does it (`POST /v1/shards`), 2 -> 4 -> 3 shards, against a
reference model: every event applied exactly once, every send credited once, every timer fired once, every grant
in the stream once, and the contexts as the model says; `/healthz` lists the new count when the rescale is done.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from playbus.loadtest.launcher import ROOT, ClusterProcess, free_port
from tests.support.configs import T0, write_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

TOKEN = "rescale-token"
CAMPAIGN = "c1"
LOTTERY = "playbus:actions:lottery"
QUIZ = """
function decide(event, ctx)
  if ctx:incr("quiz.answered", 1) == 1 then emit("lottery.grant_chance", {chances = 1}) end
end
"""
HELPED = """
function decide(event, ctx)
  send(event.data.inviter, "assist.credited", {helper = event.user})
end
"""
CREDITED = """
function decide(event, ctx)
  if ctx:incr("assist.credits", 1) == 2 then emit("lottery.grant_chance", {chances = 2}) end
end
"""
DEADLINE = """
function decide(event, ctx)
  if event.type == "task.accepted" then
    later(event.data.within_ms, "task.expired", {task = event.data.task}, "task." .. event.data.task)
  else
    ctx:incr("task.expired", 1)
  end
end
"""
RULES = [
    {"id": "quiz", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]},
    {"id": "helped", "on": "assist.helped", "script": "helped", "sends": ["assist.credited"]},
    {"id": "credited", "on": "assist.credited", "script": "credited", "emits": ["lottery.grant_chance"]},
    {"id": "accepted", "on": "task.accepted", "script": "deadline", "sends": ["task.expired"]},
    {"id": "expired", "on": "task.expired", "script": "deadline"},
]
PRODUCERS, USERS, BATCH = 3, 20, 10


def call(cluster: ClusterProcess, method: str, path: str, body: Any = None, admin: bool = False,
         timeout: float = 90) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(cluster.host, cluster.port, timeout=timeout)
    headers = {"content-type": "application/json"}
    if admin:
        headers["authorization"] = f"Bearer {TOKEN}"
    try:
        conn.request(method, path, json.dumps(body).encode() if body is not None else None, headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


class Producer(threading.Thread):
    """Posts BATCH events a request for its own users until stopped; a request not answered 200 with every event
    applied or duplicate is sent again with the same ids (as a gameplay service retries)."""

    def __init__(self, cluster: ClusterProcess, k: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.cluster, self.k, self.stop_ = cluster, k, stop
        self.sent: list[dict[str, Any]] = []
        self.retries = 0
        self.slowest = 0.0
        self.failure = ""

    def events(self, n: int) -> list[dict[str, Any]]:
        out = []
        for i in range(n, n + BATCH):
            user = f"u-{self.k}-{i % USERS}"
            e: dict[str, Any] = {"id": f"e-{self.k}-{i}", "campaign": CAMPAIGN, "user": user, "ts": T0 + i}
            if i % 5 == 1:
                e.update(type="assist.helped", user=f"h-{self.k}-{i}", data={"inviter": user})
            elif i % 7 == 2:
                e.update(type="task.accepted", data={"task": f"t{i}", "within_ms": 50})
            else:
                e["type"] = "quiz.answered"
            out.append(e)
        return out

    def run(self) -> None:
        n = 0
        while not self.stop_.is_set():
            evs = self.events(n)
            n += BATCH
            t = time.monotonic()
            while True:
                try:
                    status, doc = call(self.cluster, "POST", "/v1/events", evs)
                except OSError as e:
                    status, doc = 0, str(e)
                if status == 200 and all(r["status"] in ("applied", "duplicate") and not r["errors"]
                                         for r in doc["results"]):
                    break
                self.retries += 1
                if time.monotonic() - t > 60:
                    self.failure = f"not applied after 60 s: {status} {str(doc)[:300]}"
                    return
                time.sleep(0.2)
            self.slowest = max(self.slowest, time.monotonic() - t)
            self.sent += evs
            time.sleep(0.01)


def rescale(cluster: ClusterProcess, count: int) -> tuple[float, dict[str, Any]]:
    t = time.monotonic()
    status, doc = call(cluster, "POST", "/v1/shards", {"count": count}, admin=True)
    assert status == 202, doc
    assert doc["target"] == count
    while True:
        status, doc = call(cluster, "GET", "/v1/shards", admin=True)
        assert status == 200, doc
        if doc["count"] == count and not doc["rescaling"]:
            # done: /healthz lists the new count at once
            status, health = call(cluster, "GET", "/healthz")
            assert [s["shard"] for s in health["shards"]] == list(range(count)), health
            return time.monotonic() - t, doc
        assert time.monotonic() - t < 60, f"rescale to {count} not done in 60 s: {doc}\n{cluster.output()}"
        time.sleep(0.2)


def test_rescale_2_to_4_to_3_under_load_loses_and_doubles_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"quiz": QUIZ, "helped": HELPED, "credited": CREDITED, "deadline": DEADLINE},
                          RULES, campaign=CAMPAIGN, targets={"lottery": {"stream": LOTTERY}}, shards=2,
                          key_groups=16, batch={"max_events": 500, "max_wait_ms": 2})
    cluster = ClusterProcess(config, port=free_port(), redis_dir=tmp_path / "redis", shards=2,
                             env={"PLAYBUS_ADMIN_TOKEN": TOKEN}, cwd=ROOT, python=sys.executable).start()
    try:
        # Bad requests first: they change nothing.
        assert call(cluster, "POST", "/v1/shards", {"count": 0}, admin=True)[0] == 422
        assert call(cluster, "POST", "/v1/shards", {"count": 17}, admin=True)[0] == 422
        assert call(cluster, "POST", "/v1/shards", {"count": "4"}, admin=True)[0] == 422
        assert call(cluster, "POST", "/v1/shards", {"shards": 4}, admin=True)[0] == 400
        assert call(cluster, "POST", "/v1/shards", {"count": 4})[0] == 401
        status, doc = call(cluster, "GET", "/v1/shards", admin=True)
        assert (status, doc["count"], [s["groups"] for s in doc["shards"]]) == (200, 2, [8, 8])

        stop = threading.Event()
        producers = [Producer(cluster, k, stop) for k in range(PRODUCERS)]
        for p in producers:
            p.start()
        time.sleep(1.5)
        up_s, up = rescale(cluster, 4)
        time.sleep(1.5)
        down_s, down = rescale(cluster, 3)
        time.sleep(1.5)
        stop.set()
        for p in producers:
            p.join(120)
        print(f"\nrescale 2->4: {up_s:.2f} s, pause {up['last']['pause_ms']} ms; 4->3: {down_s:.2f} s, "
              f"pause {down['last']['pause_ms']} ms; retries {sum(p.retries for p in producers)}, slowest request "
              f"{max(p.slowest for p in producers):.2f} s", file=sys.stderr)
        assert all(not p.failure for p in producers), [p.failure for p in producers]
        assert [s["groups"] for s in up["shards"]] == [4, 4, 4, 4]
        assert [s["groups"] for s in down["shards"]] == [6, 5, 5]  # contiguous ranges of 16 over 3
        assert (up["last"]["from"], up["last"]["to"], down["last"]["from"], down["last"]["to"]) == (2, 4, 4, 3)
        assert not up["last"]["problems"] and not down["last"]["problems"]
        sent = [e for p in producers for e in p.sent]
        assert len(sent) > 300, len(sent)

        # The model.
        quizzes: Counter[str] = Counter()
        credits: Counter[str] = Counter()
        tasks: Counter[str] = Counter()
        for e in sent:
            if e["type"] == "quiz.answered":
                quizzes[e["user"]] += 1
            elif e["type"] == "assist.helped":
                credits[e["data"]["inviter"]] += 1
            else:
                tasks[e["user"]] += 1
        users = sorted(set(quizzes) | set(credits) | set(tasks))
        expected = {u: {k: v for k, v in (("quiz.answered", quizzes[u]), ("assist.credits", credits[u]),
                                          ("task.expired", tasks[u])) if v} for u in users}

        def contexts() -> dict[str, Any]:
            return {u: call(cluster, "GET", f"/v1/campaigns/{CAMPAIGN}/users/{u}/context")[1]["context"]
                    for u in users}

        end = time.monotonic() + 30  # sends and timers are decided after their senders
        got = contexts()
        while got != expected and time.monotonic() < end:
            time.sleep(0.5)
            got = contexts()
        assert got == expected, {u: (got[u], expected[u]) for u in users if got[u] != expected[u]}

        with redis.Redis.from_url(cluster.redis_url) as r:
            grants = [json.loads(f[b"action"]) for _, f in r.xrange(LOTTERY)]
        ids = Counter(g["id"] for g in grants)
        assert not [i for i, n in ids.items() if n > 1], "a grant was written twice"
        expected_grants = Counter({(u, 1) for u in quizzes} | {(u, 2) for u, n in credits.items() if n >= 2})
        assert Counter((g["user"], g["params"]["chances"]) for g in grants) == expected_grants

        status, health = call(cluster, "GET", "/healthz")
        assert status == 200, health
        assert [s["shard"] for s in health["shards"]] == [0, 1, 2]
        assert [s["groups"] for s in health["shards"]] == [6, 5, 5]
    finally:
        rep = cluster.stop()
    assert rep.exit_code == 0 and rep.stopped_line, cluster.output()
