"""End-to-end fixture: the real system started as a user starts it (`python run_cluster.py ...`), one per session.

Real Ray, real Serve, a real embedded redis-server; nothing is mocked. Teardown stops it with SIGTERM and
requires a clean stop: exit code 0, the line `playbus: stopped`, and no redis-server of ours left behind.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
TOKEN = "e2e-secret-token"
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

CHECKIN_V1 = """\
function decide(event, ctx)
  ctx:incr("checkin.count", 1)
end
"""

CONFIG_YAML = f"""\
shards: 2
key_groups: 16
dedup_window: 64
batch: {{max_events: 500, max_wait_ms: 2}}
sandbox: {{max_instructions: 200000, max_memory_kb: 4096}}
targets:
  lottery: {{stream: "{LOTTERY}"}}
campaigns:
  - id: {CAMPAIGN}
    timezone: Asia/Shanghai
    starts: 2026-01-20T00:00:00+08:00
    ends: 2026-02-20T00:00:00+08:00
    rules:
      - {{id: first_quiz, on: quiz.answered, script: first_quiz.lua, emits: [lottery.grant_chance]}}
      - {{id: checkin_count, on: checkin.checked_in, script: checkin_count.lua, emits: []}}
"""

_LISTENING = re.compile(r"^playbus: listening on (http://\S+)")
_REDIS = re.compile(r"^playbus: embedded redis-server at (redis://\S+)")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Playbus:
    """A running playbus: its HTTP address, its embedded Redis, its config and its output so far."""

    url: str
    redis_url: str
    config_path: Path
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def redis_port(self) -> int:
        return int(self.redis_url.rsplit(":", 1)[1].split("/")[0])

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
        return "\n".join(self.lines[-tail:])


def event(eid: str, user: str, type: str = "quiz.answered", ts: int = T0, **data: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"id": eid, "campaign": CAMPAIGN, "user": user, "type": type, "ts": ts}
    if data:
        e["data"] = data
    return e


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_pids(port: int) -> list[int]:
    """Live redis-server processes serving 127.0.0.1:<port> (the embedded one of our cluster)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if ("redis-server" in cmd and re.search(rf"(:|--port ){port}(\s|$)", cmd)
                and stat.rsplit(")", 1)[1].split()[0] != "Z"):
            pids.append(int(d.name))
    return pids


def _group_pids(pgid: int) -> list[int]:
    """Live processes of a process group (run_cluster.py and the Ray processes it started)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(d.name))
    return pids


def _healthz_ok(host: str, port: int) -> bool:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


def _write_config(base: Path) -> Path:
    (base / "first_quiz.lua").write_text(FIRST_QUIZ_V1, encoding="utf-8")
    (base / "checkin_count.lua").write_text(CHECKIN_V1, encoding="utf-8")
    path = base / "e2e.yaml"
    path.write_text(CONFIG_YAML, encoding="utf-8")
    return path


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Last resort after a failed start or stop: SIGKILL the process group of the run_cluster we started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


@pytest.fixture(scope="session")
def playbus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Playbus]:
    tmp = tmp_path_factory.mktemp("playbus-e2e")
    config_path = _write_config(tmp)
    port = _free_port()
    env = dict(os.environ, PLAYBUS_ADMIN_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # always a private local Ray, never someone else's cluster
    proc = subprocess.Popen(
        [str(PYTHON), "run_cluster.py", "--config", str(config_path), "--port", str(port),
         "--redis-dir", str(tmp / "redis"), "--shards", "2"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", start_new_session=True,
    )
    lines: list[str] = []
    found: dict[str, str] = {}
    listening = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            lines.append(line)
            if m := _REDIS.match(line):
                found["redis"] = m.group(1)
            if m := _LISTENING.match(line):
                found["url"] = m.group(1)
                listening.set()
        listening.set()  # EOF: the process ended

    reader = threading.Thread(target=pump, name="playbus-e2e-output", daemon=True)
    reader.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    started = False
    try:
        listening.wait(START_TIMEOUT_S)
        if "url" not in found or "redis" not in found:
            raise AssertionError("run_cluster.py did not print its redis and listening lines in time "
                                 f"(exit code {proc.poll()}); output:\n" + "\n".join(lines[-60:]))
        assert found["url"] == f"http://127.0.0.1:{port}", found["url"]
        pb = Playbus(found["url"], found["redis"], config_path, proc, lines)
        while not _healthz_ok(pb.host, pb.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"/healthz never answered 200 (exit code {proc.poll()}); output:\n"
                                     + pb.output())
            time.sleep(0.2)
        started = True
    finally:
        if not started:
            _kill_group(proc)
            if "redis" in found:
                for pid in _redis_pids(int(found["redis"].rsplit(":", 1)[1].split("/")[0])):
                    os.kill(pid, signal.SIGKILL)
    print(f"\nplaybus e2e: up in {START_TIMEOUT_S - (deadline - time.monotonic()):.1f} s at {pb.url}", file=sys.stderr)

    yield pb

    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise AssertionError(f"run_cluster.py did not stop within {STOP_TIMEOUT_S} s of SIGTERM; output:\n"
                             + pb.output()) from None
    reader.join(10)
    print(f"playbus e2e: stopped in {time.monotonic() - t:.1f} s", file=sys.stderr)
    left = _redis_pids(pb.redis_port)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 15
    while (stragglers := _group_pids(proc.pid)) and time.monotonic() < end:
        time.sleep(0.2)
    if stragglers:
        _kill_group(proc)
    assert code == 0, f"run_cluster.py exited with {code} after SIGTERM; output:\n{pb.output()}"
    assert "playbus: stopped" in lines, f"no 'playbus: stopped' line; output:\n{pb.output()}"
    assert not left, f"redis-server of the cluster still running after stop (pids {left})"
    assert not stragglers, f"processes of the cluster (Ray) still running 15 s after stop (pids {stragglers})"
