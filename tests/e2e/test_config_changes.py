"""A configuration edited between two starts, as an operator does it with `run_cluster.py`: an edited rule file
is a deploy, an inserted cap keeps the others' counts, an operator's activation survives a restart with an
unchanged file, and a changed key_groups refuses to start with a message naming it. Nothing is lost or repeated.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from playbus.loadtest.launcher import ROOT, ClusterProcess, free_port
from tests.support.configs import T0, write_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

TOKEN = "config-changes-token"
RULE = [{"id": "quiz", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]}]
DAILY = {"action": "lottery.grant_chance", "per_user": 3, "period": "day"}
ALWAYS = """
function decide(event, ctx)
  ctx:incr("quiz.answered", 1)
  emit("lottery.grant_chance", {chances = CHANCES})
end
"""


def request(cluster: ClusterProcess, method: str, path: str, body: Any = None,
            admin: bool = False) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(cluster.host, cluster.port, timeout=60)
    headers = {"content-type": "application/json"}
    if admin:
        headers["authorization"] = f"Bearer {TOKEN}"
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, data, headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw) if raw else None


def quiz(cluster: ClusterProcess, eid: str, user: str = "u1") -> dict[str, Any]:
    status, doc = request(cluster, "POST", "/v1/events",
                          {"id": eid, "campaign": "c1", "user": user, "type": "quiz.answered", "ts": T0})
    assert status == 200, doc
    result: dict[str, Any] = doc["results"][0]
    return result


def start(config: Path, redis_dir: Path) -> ClusterProcess:
    return ClusterProcess(config, port=free_port(), redis_dir=redis_dir, shards=2, env={"PLAYBUS_ADMIN_TOKEN": TOKEN},
                          cwd=ROOT, python=sys.executable).start()


def test_a_config_edited_between_starts_keeps_every_count_and_grant(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    folder = tmp_path / "cfg"
    config = write_config(folder, {"quiz": ALWAYS.replace("CHANCES", "1")}, RULE, caps=[DAILY], shards=2,
                          key_groups=16)

    cluster = start(config, redis_dir)
    try:
        assert "playbus: script quiz: version 1 loaded from its file" in cluster.output(200)
        first = [quiz(cluster, f"e{i}") for i in range(2)]
        assert [r["actions"][0]["params"] for r in first] == [{"chances": 1}] * 2
    finally:
        assert cluster.stop().ok

    # The operator edits the rule (2 chances) and inserts a weekly cap before the daily one.
    (folder / "quiz.lua").write_text(ALWAYS.replace("CHANCES", "2"))
    write_config(folder, {}, RULE, caps=[{**DAILY, "period": "week", "per_user": 10}, DAILY], shards=2,
                 key_groups=16)
    cluster = start(config, redis_dir)
    try:
        assert "playbus: script quiz: its file changed, version 2 is now active" in cluster.output(200)
        third = quiz(cluster, "e2")
        assert third["actions"][0]["params"] == {"chances": 2} and third["actions"][0]["script_version"] == 2
        assert quiz(cluster, "e3")["actions"] == []  # the daily cap kept its count of 2 across the edit
        assert quiz(cluster, "e0")["status"] == "duplicate"
        # An operator pushes version 3 and activates it.
        status, doc = request(cluster, "PUT", "/v1/scripts/quiz", ALWAYS.replace("CHANCES", "3").encode(),
                              admin=True)
        assert status == 201 and doc["version"] == 3
        assert request(cluster, "POST", "/v1/scripts/quiz/activate", {"version": 3}, admin=True)[0] == 200
    finally:
        assert cluster.stop().ok

    # Restart with the file unchanged: the operator's version 3 stays active.
    cluster = start(config, redis_dir)
    try:
        assert "its file changed" not in cluster.output(200)
        action = quiz(cluster, "e4", user="u2")["actions"][0]
        assert action["params"] == {"chances": 3} and action["script_version"] == 3
    finally:
        assert cluster.stop().ok

    # key_groups is fixed for the life of the data: another value refuses to start, naming it.
    write_config(folder, {}, RULE, caps=[DAILY], shards=2, key_groups=32)
    p = subprocess.run([sys.executable, "run_cluster.py", "--config", str(config), "--port", str(free_port()),
                        "--redis-dir", str(redis_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "key_groups: the config says 32, but the data in this Redis was written with 16" in p.stderr + p.stdout
