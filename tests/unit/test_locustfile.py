"""loadtest/locustfile.py without a cluster, and the pure parts of loadtest/locust_run.py.

locust monkey-patches the process it is imported in (gevent), so everything that imports it runs in a
subprocess: the user classes (one per gameplay of config/example.yaml, the behaviours' weights, one stream
producer), what a gameplay user posts (the deterministic behaviour's events) and how it judges the replies of
a stub HTTP server, and the stream producer's batches (into a stub Redis). No Ray, no Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from playbus.config import load_config
from playbus.loadtest.harness import BEHAVIOURS
from playbus.loadtest.locust_run import (
    HTTP_USERS,
    LOCUSTFILE,
    STREAM_USER,
    aggregated,
    locust_command,
    parse_run_time,
    summary_line,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "example.yaml"

pytestmark = pytest.mark.timeout(180)


def run_python(code: str, **env: str) -> Any:
    """Run `code` in a fresh interpreter (PLAYBUS_* variables of ours only); the JSON it prints last."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBUS_")}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


CLASSES = """
import json
import playbus.loadtest.locustfile as lf
from locust import User
users = {n: c for n, c in vars(lf).items() if isinstance(c, type) and issubclass(c, User) and not c.abstract
         and c.__module__ == lf.__name__}
print(json.dumps({n: {"weight": c.weight, "fixed_count": c.fixed_count,
                      "behaviour": getattr(c, "behaviour_class", None) and c.behaviour_class.__name__,
                      "gameplay": getattr(c, "behaviour_class", None) and c.behaviour_class.gameplay}
                  for n, c in users.items()}))
"""


def test_one_user_class_per_gameplay_of_the_example_config_and_one_stream_producer() -> None:
    classes = run_python(CLASSES)
    gameplays = {r.on.split(".", 1)[0] for c in load_config(CONFIG).campaigns for r in c.rules}
    http = {n: c for n, c in classes.items() if c["behaviour"]}
    assert {c["gameplay"] for c in http.values()} == gameplays and len(http) == len(gameplays)
    assert set(http) == set(HTTP_USERS)  # what locust_run names when it runs without the stream producer
    for c in http.values():
        assert c["weight"] == BEHAVIOURS[c["behaviour"]].weight and c["fixed_count"] == 0
    assert set(classes) - set(http) == {STREAM_USER} and classes[STREAM_USER]["fixed_count"] == 1


def test_locust_lists_the_users() -> None:
    p = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--list"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert set(p.stdout.split()) >= {*HTTP_USERS, STREAM_USER}


GAMEPLAY_USER = """
import json
import playbus.loadtest.locustfile as lf
from gevent.pywsgi import WSGIServer
from locust.env import Environment
from playbus.loadtest import harness as h

mode = {"now": "ok"}
bodies = []

def app(environ, start_response):
    events = json.loads(environ["wsgi.input"].read())
    bodies.append(events)
    if mode["now"] == "503":
        start_response("503 Service Unavailable", [("Retry-After", "1")])
        return [b"{}"]
    if mode["now"] == "garbage":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"not json"]
    status = "rejected" if mode["now"] == "reject" else "applied"
    errors = ["data: too large"] if status == "rejected" else []
    body = json.dumps({"results": [{"id": e["id"], "status": status, "actions": [], "errors": errors}
                                   for e in events]}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]

server = WSGIServer(("127.0.0.1", 0), app, log=None)
server.start()
lf.QuizUser.host = lf.TeamUser.host = f"http://127.0.0.1:{server.server_port}"
env = Environment(user_classes=[lf.QuizUser, lf.TeamUser])
env.create_local_runner()
quiz = [lf.QuizUser(env), lf.QuizUser(env)]
team = lf.TeamUser(env)
for m in ("ok", "reject", "503", "garbage", "ok"):
    mode["now"] = m
    for u in (*quiz, team):
        u.play()
expected = [h.QuizPlayer(i, "5", h.SPRING2026, "lt5") for i in range(2)] + [h.TeamMember(0, "5", h.SPRING2026, "lt5")]
want = [[u.next_events() for u in expected] for _ in range(5)]
stats = {f"{e.method} {e.name}": [e.num_requests, e.num_failures] for e in env.stats.entries.values()}
errors = sorted({str(e.error) for e in env.stats.errors.values()})
print(json.dumps({"same": [b for b in bodies] == [b for round in want for b in round], "stats": stats,
                  "errors": errors, "bases": [u.behaviour.base for u in (*quiz, team)],
                  "weights": [quiz[0].wait_time() for _ in range(50)]}))
"""


def test_a_gameplay_user_posts_its_behaviours_events_and_judges_the_reply() -> None:
    out = run_python(GAMEPLAY_USER, PLAYBUS_SEED="5", PLAYBUS_WAIT_MIN="0.01", PLAYBUS_WAIT_MAX="0.02")
    assert out["same"], "the bodies posted are not the deterministic behaviours' events"
    assert out["bases"] == ["lt5-quiz0", "lt5-quiz1", "lt5-team0"]  # numbered per class, seed from PLAYBUS_SEED
    # 5 rounds: ok, rejected, 503, not JSON, ok -> 2 of 5 good
    assert out["stats"] == {"POST /v1/events quiz": [10, 6], "POST /v1/events team": [5, 3]}
    assert out["errors"] == ["200 without a results list", "HTTP 503", "rejected quiz.answered: data: too large",
                             "rejected team.completed: data: too large"]  # by kind, without ids
    assert all(0.01 <= w <= 0.02 for w in out["weights"])  # think time from PLAYBUS_WAIT_MIN/MAX


STREAM_USER_CODE = """
import json
import msgpack
import playbus.loadtest.locustfile as lf
from locust.env import Environment
from locust.exception import StopUser
from playbus.client import StreamProducer
from playbus.client.streams import partition_of

class Pipe:
    def __init__(self, log): self.log, self.n = log, 0
    def xadd(self, stream, fields): self.log.append((stream, msgpack.unpackb(fields["events"]))); self.n += 1
    def execute(self):
        n, self.n = self.n, 0
        return [f"1-{i}" for i in range(n)]

class Redis:
    def __init__(self): self.log = []
    def pipeline(self, transaction=False): return Pipe(self.log)
    def hget(self, key, field): return b"16"

env = Environment(user_classes=[lf.StreamProducerUser], host="http://unused")
env.create_local_runner()
u = lf.StreamProducerUser(env)
try:
    u.on_start()
    started = True
except StopUser:
    started = False
fake = Redis()
u.producer = StreamProducer(fake, batch=u.batch)
u.send_batch()
u.send_batch()
entry = env.stats.entries[("playbus:{kg*}:in record batches", "XADD")]
parts_ok = all(s == f"playbus:{{kg{partition_of(e['campaign'], e['user'], 16)}}}:in"
               for s, evs in fake.log for e in evs)
events = [e for _, evs in fake.log for e in evs]
print(json.dumps({"started": started, "requests": entry.num_requests, "failures": entry.num_failures,
                  "events": len(events), "unique": len({e["id"] for e in events}), "parts_ok": parts_ok,
                  "prefixes": sorted({e["id"].split("-")[0] for e in events}),
                  "gameplays": sorted({e["type"].split(".")[0] for e in events}), "period": u.period_s}))
"""


def test_the_stream_producer_writes_batches_of_every_gameplay_into_their_partitions() -> None:
    out = run_python(STREAM_USER_CODE, PLAYBUS_SEED="3", PLAYBUS_STREAM_BATCH="60", PLAYBUS_STREAM_RATE="600")
    assert out["started"] is False  # no Redis URL: it stops at once
    assert out["requests"] == 2 and out["failures"] == 0
    assert out["events"] >= 120 and out["unique"] == out["events"] and out["parts_ok"]
    assert out["prefixes"] == ["ls3p0"]  # not the gameplay users' "lt3": no id or user collides
    assert out["gameplays"] == ["assist", "checkin", "quiz", "task", "team"]
    assert out["period"] == pytest.approx(0.1)


def test_locust_run_does_not_import_locust() -> None:
    out = run_python("import json, sys, playbus.loadtest.locust_run, playbus.loadtest.harness\n"
                     "print(json.dumps(sorted(m for m in ('locust', 'gevent', 'ray') if m in sys.modules)))")
    assert out == []


def test_run_time_and_command() -> None:
    assert parse_run_time("90") == 90 and parse_run_time("30s") == 30 and parse_run_time("2m") == 120
    assert parse_run_time("1h30m") == 5400 and parse_run_time("1m 5s") == 65
    for bad in ("", "abc", "10x", "5m3"):
        with pytest.raises(ValueError):
            parse_run_time(bad)
    cmd = locust_command("http://127.0.0.1:1", Path("/tmp/o"), 6, 6, "8s", ["QuizUser"], ["--processes", "2"],
                         python="py")
    assert cmd[:5] == ["py", "-m", "locust", "-f", str(LOCUSTFILE)]
    assert cmd[cmd.index("-u") + 1] == "6" and cmd[cmd.index("-t") + 1] == "8s"
    assert cmd[cmd.index("--csv") + 1] == "/tmp/o/locust" and cmd[cmd.index("--html") + 1] == "/tmp/o/report.html"
    assert "--headless" in cmd and cmd[-3:] == ["--processes", "2", "QuizUser"]


def test_aggregated_row_and_summary_line() -> None:
    rows = [{"Type": "POST", "Name": "/v1/events quiz", "Request Count": "10", "Failure Count": "0"},
            {"Type": "", "Name": "Aggregated", "Request Count": "1200", "Failure Count": "3", "Requests/s": "40.5",
             "50%": "17", "95%": "60", "99%": "110", "Max Response Time": "171.2"}]
    agg = aggregated(rows)
    assert agg == {"requests": 1200, "failures": 3, "rps": 40.5, "p50_ms": 17, "p95_ms": 60, "p99_ms": 110,
                   "max_ms": 171.2}
    assert aggregated([]) == dict.fromkeys(agg, 0.0)
    assert aggregated([{"Name": "Aggregated", "50%": "N/A"}])["p50_ms"] == 0.0
    assert summary_line(agg, 50, "60s") == ("summary: 50 users for 60s: 1,200 requests, 3 failures (0.25%), "
                                            "40.5 req/s, p50 17 ms, p99 110 ms")
