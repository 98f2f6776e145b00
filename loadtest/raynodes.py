"""A Ray cluster of several nodes on this machine, for tests and the soak (tests/e2e/test_multinode.py,
loadtest/multinode_soak.py):

    with LocalRayCluster(health_check=FAST_DETECTION) as cluster:
        head = cluster.add_node(num_cpus=1, resources={"head_node": 1})      # ray start --head
        worker = cluster.add_node(num_cpus=1, resources={"worker_node": 1})  # ray start --address
        ... run_cluster.py --address cluster.address ...
        worker.kill()   # the node is lost: every process of it, SIGKILL

Each node is `ray start --block` in a process session of its own, on free ports, under a temp dir of its own: the
raylet and the workers it forks keep that session (Ray gives each worker a process group of its own, not a
session), so a node's processes are found by session id, and only ours are ever signalled. `ray stop` is never
used: it stops every Ray process of the machine, other people's clusters included. The nodes' ids and states come
from the GCS (no driver needed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from playbus.actors.store.server import free_port

__all__ = ["DEFAULT_DETECTION", "DRIVER_ENV", "FAST_DETECTION", "LocalRayCluster", "RayNode", "session_pids"]

# The GCS declares a node dead after `failure_threshold` health checks in a row fail, one every `period_ms`, each
# failing when the raylet does not answer within `timeout_ms` (at once when its port refuses: a killed raylet).
# Ray's defaults (ray_config_def.h): 3000 ms, 10000 ms, 5 -> a killed node is found in ~15 s, a silent one
# (a machine gone, no TCP reset) in up to ~65 s.
DEFAULT_DETECTION: dict[str, str] = {}
FAST_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                  "RAY_health_check_failure_threshold": "3"}
# Ray >= 2.5x turns token authentication on for `ray start` as soon as ~/.ray/auth_token exists (any local
# ray.init() writes one), and then a client without RAY_AUTH_MODE=token is refused. These throwaway clusters
# state their mode instead of depending on that file: off. Drivers that join them (run_cluster.py) get this too.
DRIVER_ENV = {"RAY_AUTH_MODE": "disabled"}


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (f := _stat(int(d.name))) is not None and f[0] != "Z" and int(f[3]) == sid:
            out.append(int(d.name))
    return sorted(out)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class RayNode:
    """One `ray start --block` (a session of its own) and what it started."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], temp_dir: Path, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.temp_dir = temp_dir
        self.log = log
        self.node_id = ""  # from the GCS, once registered
        self.killed_at: float | None = None
        self.frozen = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """Every live process of this node: `ray start`, the raylet, its agents and workers."""
        return session_pids(self.proc.pid)

    def processes(self, title_prefix: str) -> list[int]:
        """This node's processes whose title (command line) starts with `title_prefix` (`ray::ServeReplica...`)."""
        return [p for p in self.pids() if cmdline(p).startswith(title_prefix)]

    def kill(self) -> float:
        """Lose the node: SIGKILL every process of it at once (raylet, workers, agents); the time (monotonic)."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.killed_at = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        return self.killed_at

    def freeze(self) -> float:
        """A node gone silent (a machine lost without a TCP reset): SIGSTOP every process of it. Returns the time."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self.frozen = True
        return time.monotonic()

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM to `ray start --block` (it stops the node's processes), then SIGKILL whatever is left of it."""
        if self.proc.poll() is None and not self.frozen:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        end = time.monotonic() + 5
        while self.pids() and time.monotonic() < end:
            time.sleep(0.2)
        self.kill()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class LocalRayCluster:
    """A head node and worker nodes on this machine (see the module docstring). `health_check`: the GCS's
    node-death detection settings (environment of the head node)."""

    def __init__(self, health_check: Mapping[str, str] | None = None, ray: str | Path | None = None,
                 base_dir: str | Path | None = None) -> None:
        self.ray = str(ray or Path(sys.executable).with_name("ray"))
        # Short: the nodes' Unix sockets live under it (a socket path has at most 107 bytes).
        self.base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="pbn-", dir="/tmp"))
        self._own_base = base_dir is None
        self.health_check = dict(FAST_DETECTION if health_check is None else health_check)
        self.gcs_port = 0
        self.nodes: list[RayNode] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _env(self, head: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_health_check")}
        env.update(DRIVER_ENV)
        if head:
            env.update(self.health_check)
        return env

    def add_node(self, num_cpus: int, resources: Mapping[str, float] | None = None,
                 timeout_s: float = 90) -> RayNode:
        """Start the head node (the first call) or a worker node; wait until the GCS lists it alive."""
        head = not self.nodes
        name = "head" if head else f"worker{len(self.nodes)}"
        temp_dir = self.base / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.ray, "start", "--block", "--num-cpus", str(num_cpus), "--resources", json.dumps(resources or {}),
               "--disable-usage-stats", "--temp-dir", str(temp_dir), "--node-ip-address", "127.0.0.1",
               "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--min-worker-port", "0", "--max-worker-port", "0", "--object-store-memory", str(200 * 2**20)]
        if head:
            self.gcs_port = free_port()
            cmd += ["--head", "--port", str(self.gcs_port), "--include-dashboard", "false",
                    "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port())]
        else:
            cmd += ["--address", self.address]
        log = self.base / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, env=self._env(head), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        node = RayNode(name, proc, temp_dir, log)
        self.nodes.append(node)
        deadline = time.monotonic() + timeout_s
        while not node.node_id:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not come up (exit {proc.poll()}):\n{node.tail()}")
            time.sleep(0.5)
            with contextlib.suppress(Exception):  # the GCS is not up yet
                for node_id, (alive, socket) in self.node_states().items():
                    if alive and socket.startswith(str(temp_dir) + "/"):
                        node.node_id = node_id
        return node

    def node_states(self) -> dict[str, tuple[bool, str]]:
        """node id (hex) -> (alive, its raylet's socket path), from the GCS."""
        from ray._raylet import GcsClient  # type: ignore[attr-defined]

        client = GcsClient(address=self.address)
        out: dict[str, tuple[bool, str]] = {}
        info: Any
        for node_id, info in client.get_all_node_info(timeout=5).items():
            out[node_id.hex()] = (info.state == 0, info.raylet_socket_name)  # 0: ALIVE
        return out

    def alive(self, node: RayNode) -> bool:
        return self.node_states().get(node.node_id, (False, ""))[0]

    def stop(self) -> None:
        """Stop every node (workers first), by pid; remove the temp dir we made."""
        for node in reversed(self.nodes):
            node.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
