"""`run_cluster.py` as a subprocess: start it, wait until it serves, stop it with SIGTERM and check the stop.

Used by loadtest/locust_run.py (`make loadtest`), loadtest/soak.py and the e2e fixture (tests/e2e/conftest.py):

    with ClusterProcess("config/example.yaml", shards=2) as cluster:
        ... cluster.url, cluster.redis_url ...
    assert cluster.stop_report.ok

`start()` runs `run_cluster.py --config FILE --port <port> --redis-dir <dir> [--shards N]` in a session (and
process group) of its own, always on a private local Ray (RAY_ADDRESS is dropped), and reads its output in a
thread (kept in `lines`, optionally echoed). It waits for the lines "playbus: embedded redis-server at ..." and
"playbus: listening on http://127.0.0.1:<port>", then for /healthz to answer 200; if any of that fails it kills
everything it started and raises `ClusterStartError`.

`stop()` sends SIGTERM and waits; its `StopReport` says the exit code, whether "playbus: stopped" was printed,
and what was left behind: a redis-server still serving our Redis port, processes of the child's process group
(Ray's) still alive 15 s later. Leftovers are killed (SIGKILL), reported, and make the stop not `ok`.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from playbus.actors.store.server import free_port

__all__ = ["ROOT", "ClusterProcess", "ClusterStartError", "StopReport", "free_port", "http_get"]

ROOT = Path(__file__).resolve().parents[1]
STOPPED_LINE = "playbus: stopped"
_LISTENING = re.compile(r"^playbus: listening on (http://\S+)")
_REDIS = re.compile(r"^playbus: embedded redis-server at (redis://\S+)")


class ClusterStartError(RuntimeError):
    """run_cluster.py did not come up (everything it started has been killed)."""


def http_get(host: str, port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, session, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _live_pids() -> Iterable[int]:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            yield int(d.name)


def _live_stats() -> Iterable[tuple[int, list[str]]]:
    """Processes that are alive (not zombies), with their /proc/<pid>/stat fields."""
    for pid in _live_pids():
        f = _proc_stat(pid)
        if f is not None and f[0] != "Z":
            yield pid, f


@dataclass
class StopReport:
    """What `ClusterProcess.stop()` saw."""

    exit_code: int | None = None
    stopped_line: bool = False
    seconds: float = 0.0
    timed_out: bool = False
    leftover_redis: list[int] = field(default_factory=list)
    stragglers: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.exit_code == 0 and self.stopped_line and not self.timed_out and not self.leftover_redis
                and not self.stragglers)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class ClusterProcess:
    """One run_cluster.py subprocess (see the module docstring)."""

    def __init__(self, config_path: str | Path, port: int | None = None, redis_dir: str | Path | None = None,
                 shards: int | None = None, env: Mapping[str, str] | None = None, cwd: str | Path = ROOT,
                 python: str | Path = sys.executable, echo: Callable[[str], None] | None = None,
                 start_timeout_s: float = 180, stop_timeout_s: float = 90,
                 command: Sequence[str] | None = None, redis_url: str | None = None,
                 address: str | None = None) -> None:
        """`command`: the program to run (default: `python run_cluster.py` in `cwd`; an installed playbus has
        the `run_cluster` command). `redis_url`: a Redis (or Redis Cluster) of the caller's, passed as --redis,
        instead of the embedded one (then no redis-server is ours to check or kill). `address`: an existing Ray
        cluster to join (--address) instead of a private local Ray."""
        self.command = list(command) if command is not None else [str(python), "run_cluster.py"]
        self.config_path = Path(config_path)
        self.requested_port = port
        self.redis_dir = Path(redis_dir) if redis_dir is not None else None
        self.shards = shards
        self.extra_env = dict(env or {})
        self.cwd = Path(cwd)
        self.python = str(python)
        self.echo = echo
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.url = ""
        self.external_redis = redis_url
        self.address = address
        self.redis_url = redis_url or ""
        self.stop_report: StopReport | None = None
        self._tmp: str | None = None  # our temp dir for the embedded Redis when no redis_dir was given
        self._reader: threading.Thread | None = None

    # -- addresses and output ---------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """Pid of run_cluster.py, also the id of its process group and session."""
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def redis_port(self) -> int:
        return int(self.redis_url.rsplit(":", 1)[1].split("/")[0])

    def output(self, tail: int = 60) -> str:
        return "\n".join(self.lines[-tail:])

    def healthy(self) -> bool:
        try:
            return http_get(self.host, self.port, "/healthz", 5)[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    # -- start ------------------------------------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> ClusterProcess:
        """Start run_cluster.py and wait until /healthz answers 200; `ClusterStartError` if it does not."""
        if self.proc is not None:
            raise RuntimeError("already started")
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        port = self.requested_port if self.requested_port is not None else free_port()
        redis_dir = self.redis_dir
        if redis_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="playbus-cluster-")
            redis_dir = Path(self._tmp) / "redis"
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        env.pop("RAY_ADDRESS", None)  # always a private local Ray, never someone else's cluster
        cmd = [*self.command, "--config", str(self.config_path), "--port", str(port), "--redis-dir", str(redis_dir)]
        if self.external_redis:
            cmd += ["--redis", self.external_redis]
        if self.address:
            cmd += ["--address", self.address]
        if self.shards is not None:
            cmd += ["--shards", str(self.shards)]
        proc = self.proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True)
        found: dict[str, str] = {"redis": self.external_redis} if self.external_redis else {}
        listening = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                self.lines.append(line)
                if self.echo is not None:
                    self.echo(line)
                if m := _REDIS.match(line):
                    found["redis"] = m.group(1)
                if m := _LISTENING.match(line):
                    found["url"] = m.group(1)
                    listening.set()
            listening.set()  # EOF: the process ended

        self._reader = threading.Thread(target=pump, name="playbus-cluster-output", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        ok = False
        try:
            listening.wait(timeout_s)
            if "url" not in found or "redis" not in found:
                raise ClusterStartError("run_cluster.py did not print its redis and listening lines in time "
                                        f"(exit code {proc.poll()}); output:\n{self.output()}")
            self.redis_url = found["redis"]
            if found["url"] != f"http://127.0.0.1:{port}":
                raise ClusterStartError(f"run_cluster.py listens on {found['url']}, not on port {port} as asked")
            self.url = found["url"]
            while not self.healthy():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ClusterStartError(f"/healthz never answered 200 (exit code {proc.poll()}); output:\n"
                                            + self.output())
                time.sleep(0.2)
            ok = True
        finally:
            if not ok:
                self.kill()
        return self

    # -- our processes ----------------------------------------------------------------------------------
    def descendants(self) -> list[int]:
        """Live processes descended from our run_cluster.py (Ray's raylet, workers, redis-server...)."""
        if self.proc is None:
            return []
        parent = {pid: int(f[1]) for pid, f in _live_stats()}
        out = []
        for pid in parent:
            p, hops = parent.get(pid), 0
            while p and p != 1 and hops < 64:
                if p == self.proc.pid:
                    out.append(pid)
                    break
                p, hops = parent.get(p), hops + 1
        return out

    def processes(self, title_prefix: str) -> list[int]:
        """Our processes whose command line (Ray sets it to the process title) starts with `title_prefix`:
        descendants of run_cluster.py, or members of its session (it was started in a new one)."""
        mine = set(self.descendants())
        if self.proc is not None:
            mine.update(pid for pid, f in _live_stats() if int(f[3]) == self.proc.pid)
        return sorted(p for p in mine if _cmdline(p).startswith(title_prefix))

    def group_pids(self) -> list[int]:
        """Live processes of run_cluster.py's process group (itself and the Ray processes it started)."""
        if self.proc is None:
            return []
        return [pid for pid, f in _live_stats() if int(f[2]) == self.proc.pid]

    def redis_pids(self) -> list[int]:
        """Live redis-server processes serving our embedded Redis port."""
        if not self.redis_url or self.external_redis:
            return []
        pattern = re.compile(rf"(:|--port ){self.redis_port}(\s|$)")
        out = []
        for pid, _ in _live_stats():
            cmd = _cmdline(pid)
            if "redis-server" in cmd and pattern.search(cmd):
                out.append(pid)
        return out

    def _kill_group(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def _kill_redis(self, pids: Iterable[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        """Last resort: SIGKILL the process group of the run_cluster.py we started, and our redis-server."""
        self._kill_group()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        self._kill_redis(self.redis_pids())
        self._cleanup_tmp()

    def _cleanup_tmp(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- stop -------------------------------------------------------------------------------------------
    def stop(self, timeout_s: float | None = None) -> StopReport:
        """SIGTERM, wait, check the stop and kill (and report) whatever is left of ours."""
        if self.proc is None:
            self.stop_report = StopReport(exit_code=0, stopped_line=True)
            return self.stop_report
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        t = time.monotonic()
        rep = StopReport()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rep.exit_code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rep.timed_out = True
            self.kill()
        if self._reader is not None:
            self._reader.join(10)
        rep.seconds = round(time.monotonic() - t, 1)
        rep.stopped_line = STOPPED_LINE in self.lines
        rep.leftover_redis = self.redis_pids()
        self._kill_redis(rep.leftover_redis)
        end = time.monotonic() + 15
        while (stragglers := self.group_pids()) and time.monotonic() < end:
            time.sleep(0.2)
        rep.stragglers = stragglers
        if stragglers:
            self._kill_group()
        self._cleanup_tmp()
        self.stop_report = rep
        return rep

    def __enter__(self) -> ClusterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.stop_report is None:
            self.stop()
