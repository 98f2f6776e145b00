"""LocalRedisCluster: a Redis Cluster of private redis-server processes (masters only) on free 127.0.0.1 ports,
for the tests and for trying playbus on a cluster (`run_cluster.py --redis redis+cluster://127.0.0.1:PORT`).

    with LocalRedisCluster(masters=3) as rc:
        rc.url          # redis+cluster://127.0.0.1:<port of the first node>
        rc.client()     # a redis.cluster.RedisCluster
        rc.move_slot(slot, to=1)   # a live slot migration (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE)

The slots are split evenly in ranges (node i gets the i-th range), assigned with CLUSTER ADDSLOTSRANGE, and the
nodes meet with CLUSTER MEET; `start` returns once every node says cluster_state:ok and knows every other.
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from playbus.actors.store.errors import RedisServerError
from playbus.actors.store.server import RedisServer

__all__ = ["SLOTS", "LocalRedisCluster", "cluster_port"]

SLOTS = 16384
BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int] | None = None) -> int:
    """A port free on 127.0.0.1 whose cluster bus port (+10000) is free too, below Redis's limit of 55535."""
    taken = taken or set()
    for _ in range(1000):
        port = random.randrange(20_000, 45_000)
        if port in taken or port + BUS_OFFSET in taken:
            continue
        if _free(port) and _free(port + BUS_OFFSET):
            return port
    raise RedisServerError("no free port pair (port, port + 10000) for a Redis Cluster node")


class LocalRedisCluster:
    """`masters` redis-servers (AOF on, `appendfsync` policy) forming one cluster, data under `dir`."""

    def __init__(self, dir: str | Path | None = None, masters: int = 3, appendfsync: str = "everysec",
                 node_timeout_ms: int = 5000, startup_timeout: float = 30.0) -> None:
        if masters < 1:
            raise ValueError("masters must be >= 1")
        self.masters = masters
        self.startup_timeout = startup_timeout
        base = Path(dir) if dir is not None else None
        self.nodes: list[RedisServer] = [
            RedisServer(dir=None if base is None else base / f"node{i}", appendfsync=appendfsync,
                        extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                    "--cluster-node-timeout", str(node_timeout_ms),
                                    "--cluster-require-full-coverage", "yes"])
            for i in range(masters)
        ]
        self._clients: list[Any] = []
        self.node_ids: list[str] = []  # CLUSTER MYID of each node, once started

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The URL playbus takes for this cluster (any node is a way in; the first is given)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def client(self, **kwargs: Any) -> Any:
        """A redis-py cluster client (bytes responses unless told otherwise)."""
        from redis.cluster import RedisCluster  # noqa: PLC0415 - keeps this module importable without redis

        c = RedisCluster(host="127.0.0.1", port=self.nodes[0].port, **kwargs)
        self._clients.append(c)
        return c

    def node_client(self, i: int) -> Any:
        """A plain client of node i (for CLUSTER commands and looking at one node)."""
        return self.nodes[i].client(socket_timeout=10)

    def slot_ranges(self) -> list[tuple[int, int]]:
        """The (first, last) slot range assigned to each node at start."""
        per = SLOTS // self.masters
        return [(i * per, SLOTS - 1 if i == self.masters - 1 else (i + 1) * per - 1) for i in range(self.masters)]

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> LocalRedisCluster:
        try:
            taken: set[int] = set()
            for n in self.nodes:
                for attempt in range(3):
                    if not n.running:
                        n.port = cluster_port(taken)
                    try:
                        n.start()
                        break
                    except RedisServerError:
                        if attempt == 2:  # else most likely lost a race for the port or its bus port: another
                            raise
                taken.update((n.port, n.port + BUS_OFFSET))
            ids = []
            for i, (first, last) in enumerate(self.slot_ranges()):
                c = self.node_client(i)
                try:
                    c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                    c.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                    ids.append(c.execute_command("CLUSTER", "MYID").decode())
                finally:
                    c.close()
            c = self.node_client(0)
            try:
                for n in self.nodes[1:]:
                    c.execute_command("CLUSTER", "MEET", "127.0.0.1", n.port)
            finally:
                c.close()
            self.node_ids = ids
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float | None = None) -> None:
        """Until every node says cluster_state:ok, knows every node and agrees on who serves every slot."""
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        last = ""
        while time.monotonic() < deadline:
            views = []
            ok = True
            for i in range(self.masters):
                c = self.node_client(i)
                try:
                    info = c.execute_command("CLUSTER", "INFO").decode()
                    slots = c.execute_command("CLUSTER", "SLOTS")
                except Exception as e:  # noqa: BLE001 - not up yet
                    ok, last = False, f"node {i}: {e}"
                    break
                finally:
                    c.close()
                fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
                if fields.get("cluster_state") != "ok" or int(fields.get("cluster_known_nodes", 0)) != self.masters:
                    ok, last = False, f"node {i}: {info!r}"
                    break
                views.append(sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in slots))
            if ok and all(v == views[0] for v in views):
                return
            time.sleep(0.05)
        raise RedisServerError(f"the Redis Cluster did not become ok within the timeout: {last}")

    def stop(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing what may be broken already
                pass
        self._clients = []
        for n in self.nodes:
            n.stop()

    def cleanup(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        self._clients = []
        for n in self.nodes:
            n.cleanup()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()

    # -- slots -------------------------------------------------------------------------------------
    def owner(self, slot: int) -> int:
        """The index of the node that serves `slot` (as node 0 sees it)."""
        c = self.node_client(0)
        try:
            for first, last, node in c.execute_command("CLUSTER", "SLOTS"):
                if int(first) <= slot <= int(last):
                    return self.ports.index(int(node[1]))
        finally:
            c.close()
        raise RedisServerError(f"slot {slot} is served by no node")

    def move_slot(self, slot: int, to: int, batch: int = 10, pause_s: float = 0.0) -> int:
        """Migrate `slot` to node `to` live, as redis-cli --cluster reshard does: the target IMPORTING, the source
        MIGRATING, its keys MIGRATEd `batch` at a time (`pause_s` between batches, to leave time for traffic in
        the middle of the move), then SETSLOT NODE on the target, the source and every other node. The number of
        keys moved."""
        src = self.owner(slot)
        if src == to:
            return 0
        s, d = self.node_client(src), self.node_client(to)
        moved = 0
        try:
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_ids[src])
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_ids[to])
            while True:
                keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                s.execute_command("MIGRATE", "127.0.0.1", self.nodes[to].port, "", 0, 10_000, "KEYS", *keys)
                moved += len(keys)
                if pause_s:
                    time.sleep(pause_s)
            for i in [to, src, *[j for j in range(self.masters) if j not in (src, to)]]:
                c = self.node_client(i)
                try:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.node_ids[to])
                finally:
                    c.close()
        finally:
            s.close()
            d.close()
        return moved
