"""The Ray side of a rescale: start, call and end shard actors for service/rescale.py's Rescaler."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray

__all__ = ["RayShardControl"]

log = logging.getLogger("playbus.rescale")
CALL_TIMEOUT_S = 60.0


class RayShardControl:
    """`shards`: the cluster's list of shard handles, by index (grown and shrunk here); `make(i)`: a new shard
    actor of index i (named, placed as the cluster places shards)."""

    def __init__(self, shards: list[Any], make: Callable[[int], Any]) -> None:
        self.shards = shards
        self.make = make

    def start(self, shards: list[int]) -> None:
        for i in shards:
            handle = self._make(i)
            if i < len(self.shards):
                self.shards[i] = handle
            else:
                self.shards.append(handle)
        ray.get([self.shards[i].start.remote() for i in shards], timeout=CALL_TIMEOUT_S)

    def _make(self, i: int) -> Any:
        """make(i), waiting while the name of a shard ended by an earlier rescale is still taken."""
        for attempt in range(50):
            try:
                return self.make(i)
            except ValueError as e:  # "The name ... is already taken": ray.kill has not released it yet
                if "already" not in str(e) or attempt == 49:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def call(self, calls: list[tuple[int, str, tuple[Any, ...]]]) -> list[Any]:
        refs = [getattr(self.shards[i], method).remote(*args) for i, method, args in calls]
        out: list[Any] = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=CALL_TIMEOUT_S))
            except Exception as e:  # noqa: BLE001 - the Rescaler decides what a failed call means
                out.append(e)
        return out

    def stop(self, shards: list[int]) -> None:
        handles = [self.shards[i] for i in shards]
        try:
            ray.get([h.close.remote() for h in handles], timeout=CALL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - ended below anyway; their groups are already elsewhere
            log.warning("rescale: closing removed shards: %s", e)
        for h in handles:
            ray.kill(h, no_restart=True)
        del self.shards[min(shards):]
