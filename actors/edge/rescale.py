"""The Ray side of a rescale: start, call and end shard actors for service/rescale.py's Rescaler."""

from __future__ import annotations

import logging
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
            handle = self.make(i)
            if i < len(self.shards):
                self.shards[i] = handle
            else:
                self.shards.append(handle)
        ray.get([self.shards[i].start.remote() for i in shards], timeout=CALL_TIMEOUT_S)

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
