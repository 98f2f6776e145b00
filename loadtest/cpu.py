"""CPU time per process group of a running playbus on this machine (psutil), for CPU-per-event figures.

Groups: the driver (this process), the shards, redis-server, Serve (proxy and replicas), the input router,
delivery, and Ray's own daemons (raylet, GCS, the Serve controller and other workers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import psutil

__all__ = ["GROUPS", "CpuMeter"]

GROUPS = ("driver", "shards", "redis", "serve", "router", "delivery", "ray")
_TITLES = (  # Ray names a worker process after its actor class (ours are wrapped: "_UserActivityActor")
    (("ray::_UserActivityActor", "ray::UserActivityActor"), "shards"),
    (("ray::ServeReplica", "ray::ProxyActor"), "serve"),
    (("ray::_InputRouterActor", "ray::InputRouterActor"), "router"),
    (("ray::_DeliveryActor", "ray::DeliveryActor"), "delivery"),
)


def _group(proc: psutil.Process, redis_pids: Iterable[int]) -> str | None:
    if proc.pid == os.getpid():
        return "driver"
    if proc.pid in redis_pids:
        return "redis"
    try:
        cmd = " ".join(proc.cmdline())
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    for prefix, group in _TITLES:
        if cmd.startswith(prefix):
            return group
    if cmd.startswith("ray::") or "raylet" in name or "gcs_server" in name or "ray/" in cmd or "ray." in cmd:
        return "ray"
    return None


class CpuMeter:
    """CPU seconds (user + system) per group, summed over the group's processes; `refresh()` finds them (call it
    once the cluster is up, and after a restart)."""

    def __init__(self, redis_pids: Iterable[int] = ()) -> None:
        self.redis_pids = set(redis_pids)
        self.procs: dict[int, tuple[str, psutil.Process]] = {}
        self.refresh()

    def refresh(self) -> None:
        me = psutil.Process()
        candidates = [me, *me.children(recursive=True)]
        for pid in self.redis_pids:
            try:
                candidates.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        for proc in psutil.process_iter():
            if proc.pid not in {p.pid for p in candidates}:
                try:
                    if " ".join(proc.cmdline()).startswith("ray::"):
                        candidates.append(proc)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
        self.procs = {}
        for proc in candidates:
            group = _group(proc, self.redis_pids)
            if group is not None:
                self.procs[proc.pid] = (group, proc)

    def sample(self) -> dict[str, float]:
        out = dict.fromkeys(GROUPS, 0.0)
        for group, proc in self.procs.values():
            try:
                t = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            out[group] += t.user + t.system
        return out

    @staticmethod
    def per_event(before: dict[str, float], after: dict[str, float], events: int) -> dict[str, float]:
        """Microseconds of CPU per event, per group, between two samples."""
        return {g: (after[g] - before[g]) / max(1, events) * 1e6 for g in GROUPS}
