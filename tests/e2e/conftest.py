"""End-to-end fixture: the real system started as a user starts it (`python run_cluster.py ...`), one per session.

Real Ray, real Serve, a real embedded redis-server; nothing is mocked. Teardown stops it with SIGTERM and
requires a clean stop: exit code 0, the line `playbus: stopped`, and no redis-server of ours left behind.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from playbus.loadtest.launcher import ClusterProcess, free_port
from tests.support.configs import write_config

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
TOKEN = "e2e-secret-token"
OPS_TOKEN = "ops-token-1234"  # a second operator's token (PLAYBUS_ADMIN_TOKENS), labelled "ops" in the audit log
CAMPAIGN = "e2e"
T0 = 1769000000000  # 2026-01-21T20:53:20+08:00, inside the campaign window below
LOTTERY = "playbus:actions:lottery"
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60

FIRST_QUIZ_V1 = """\
function decide(event, ctx)
  local n = ctx:incr("quiz.answered", 1)
  if n == 1 then emit("lottery.grant_chance", {chances = 1}) end
end
"""

# Version 2 of first_quiz: visibly different (2 chances, and it marks the context).
FIRST_QUIZ_V2 = """\
function decide(event, ctx)
  local n = ctx:incr("quiz.answered", 1)
  ctx:set("quiz.script", "v2")
  if n == 1 then emit("lottery.grant_chance", {chances = 2}) end
end
"""

CHECKIN_V1 = """\
function decide(event, ctx)
  ctx:incr("checkin.count", 1)
end
"""

# Rules that reach other users and the future: a helper credits an inviter (send), a task sets a deadline
# (later) that its completion cancels.
HELPED = """\
function decide(event, ctx)
  send(event.data.inviter, "assist.credited", {helper = event.user})
end
"""
CREDITED = """\
function decide(event, ctx)
  if ctx:incr("assist.credits", 1) == 2 then emit("lottery.grant_chance", {chances = 2}) end
end
"""
DEADLINE = """\
function decide(event, ctx)
  if event.type == "task.accepted" then
    later(event.data.within_ms, "task.expired", {task = event.data.task}, "task." .. event.data.task)
  elseif event.type == "task.completed" then
    cancel("task." .. event.data.task)
    ctx:incr("task.done", 1)
  else
    ctx:incr("task.expired", 1)
  end
end
"""

RULES = [
    {"id": "first_quiz", "on": "quiz.answered", "script": "first_quiz", "emits": ["lottery.grant_chance"]},
    {"id": "checkin_count", "on": "checkin.checked_in", "script": "checkin_count", "emits": []},
    {"id": "helped", "on": "assist.helped", "script": "helped", "sends": ["assist.credited"]},
    {"id": "credited", "on": "assist.credited", "script": "credited", "emits": ["lottery.grant_chance"]},
    {"id": "accepted", "on": "task.accepted", "script": "deadline", "sends": ["task.expired"]},
    {"id": "completed", "on": "task.completed", "script": "deadline"},
    {"id": "expired", "on": "task.expired", "script": "deadline"},
]
BUDGET = {"name": "chances", "action": "lottery.grant_chance", "param": "chances", "total": 1_000_000}
SETTINGS = {"shards": 2, "key_groups": 16, "dedup_window": 64, "batch": {"max_events": 500, "max_wait_ms": 2},
            "sandbox": {"max_instructions": 200000, "max_memory_kb": 4096}}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Playbus:
    """A running playbus: its HTTP address, its embedded Redis, its config and its output so far."""

    def __init__(self, cluster: ClusterProcess, config_path: Path) -> None:
        self.cluster = cluster
        self.config_path = config_path

    @property
    def url(self) -> str:
        return self.cluster.url

    @property
    def redis_url(self) -> str:
        return self.cluster.redis_url

    @property
    def host(self) -> str:
        return self.cluster.host

    @property
    def port(self) -> int:
        return self.cluster.port

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 60) -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body, headers or {})
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def post_events(self, events: Any, msgpack_body: bool = False) -> Reply:
        if msgpack_body:
            import msgpack

            return self.request("POST", "/v1/events", msgpack.packb(events),
                                {"Content-Type": "application/msgpack"})
        return self.request("POST", "/v1/events", json.dumps(events).encode(), {"Content-Type": "application/json"})

    def admin(self, method: str, path: str, body: bytes | str | dict[str, Any] | None = None) -> Reply:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        if isinstance(body, dict):
            body = json.dumps(body)
            headers["Content-Type"] = "application/json"
        if isinstance(body, str):
            body = body.encode()
        return self.request(method, path, body, headers)

    def context(self, user: str, campaign: str = CAMPAIGN) -> dict[str, Any]:
        r = self.request("GET", f"/v1/campaigns/{campaign}/users/{user}/context")
        assert r.status == 200, r.body
        return r.json()["context"]  # type: ignore[no-any-return]

    def decisions(self, user: str, limit: int = 100, campaign: str = CAMPAIGN) -> list[dict[str, Any]]:
        r = self.request("GET", f"/v1/campaigns/{campaign}/users/{user}/decisions?limit={limit}")
        assert r.status == 200, r.body
        return r.json()["decisions"]  # type: ignore[no-any-return]

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=10)

    def output(self, tail: int = 60) -> str:
        return self.cluster.output(tail)


def event(eid: str, user: str, type: str = "quiz.answered", ts: int = T0, **data: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"id": eid, "campaign": CAMPAIGN, "user": user, "type": type, "ts": ts}
    if data:
        e["data"] = data
    return e


# The test vectors of `credited` (beside its script): a push that breaks them is refused.
CREDITED_VECTORS = """\
cases:
  - name: the second credit grants 2 chances
    events:
      - {id: h1, user: h1, type: assist.helped, ts: 1769000000000, data: {inviter: inv}}
      - {id: h2, user: h2, type: assist.helped, ts: 1769000000001, data: {inviter: inv}}
    expect:
      actions: [{type: lottery.grant_chance, params: {chances: 2}, user: inv}]
      contexts: {inv: {assist.credits: 2}, h1: {}, h2: {}}
"""


def _write_config(base: Path) -> Path:
    (base / "credited.test.yaml").write_text(CREDITED_VECTORS, encoding="utf-8")
    return write_config(base, {"first_quiz": FIRST_QUIZ_V1, "checkin_count": CHECKIN_V1, "helped": HELPED,
                                 "credited": CREDITED, "deadline": DEADLINE}, RULES, name="e2e.yaml",
                        campaign=CAMPAIGN, targets={"lottery": {"stream": LOTTERY}}, budgets=[BUDGET], **SETTINGS)


@pytest.fixture(scope="session")
def playbus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Playbus]:
    tmp = tmp_path_factory.mktemp("playbus-e2e")
    config_path = _write_config(tmp)
    cluster = ClusterProcess(config_path, port=free_port(), redis_dir=tmp / "redis", shards=2,
                             env={"PLAYBUS_ADMIN_TOKEN": TOKEN, "PLAYBUS_ADMIN_TOKENS": f"ops:{OPS_TOKEN}"},
                             cwd=ROOT, python=PYTHON,
                             start_timeout_s=START_TIMEOUT_S, stop_timeout_s=STOP_TIMEOUT_S)
    t = time.monotonic()
    cluster.start()  # ClusterStartError (with the output) if it does not come up; then nothing of it is left
    pb = Playbus(cluster, config_path)
    print(f"\nplaybus e2e: up in {time.monotonic() - t:.1f} s at {pb.url}", file=sys.stderr)

    yield pb

    rep = cluster.stop()
    print(f"playbus e2e: stopped in {rep.seconds:.1f} s", file=sys.stderr)
    assert not rep.timed_out, (f"run_cluster.py did not stop within {STOP_TIMEOUT_S} s of SIGTERM; output:\n"
                               + pb.output())
    assert rep.exit_code == 0, f"run_cluster.py exited with {rep.exit_code} after SIGTERM; output:\n{pb.output()}"
    assert rep.stopped_line, f"no 'playbus: stopped' line; output:\n{pb.output()}"
    assert not rep.leftover_redis, f"redis-server of the cluster still running after stop (pids {rep.leftover_redis})"
    assert not rep.stragglers, ("processes of the cluster (Ray) still running 15 s after stop "
                                f"(pids {rep.stragglers})")
