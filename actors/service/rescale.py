"""Rescaling a running cluster: move whole key groups between shards while traffic flows (Flink's rescaling from
key groups, Orleans's grain hand-over), plain Python over a ShardControl that the edge implements with Ray.

From N to M shards, every group goes to its owner in the contiguous layout of M (keys.contiguous_owners):
1. start the shards N..M-1 (they own nothing yet: the map gives them nothing);
2. write the new owners into the shard map (first, so that a shard restarting half-way takes what the map gives
   it; the epochs fence whatever overlaps);
3. every losing shard releases its moving groups at once: it refuses their events from then on (NotOwner: the
   ingress reads the map again and sends them to the new owner), stops reading, lets the batches already
   submitted commit, and drops the groups and their users from memory;
4. every gaining shard acquires them: it claims each with a higher epoch and reads its partition and timers from
   the committed offset; users (context, dedup ids, timers) load from their snapshots at their next event;
5. the map's count becomes M (what /healthz lists), then the shards M..N-1 are closed and ended.
Events of a moving group wait (HTTP callers are retried by the ingress; partitions and timers keep them) from
step 3 to step 4: that is the rescale's pause, measured and kept in the map's "last".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from playbus.actors.engine.keys import contiguous_owners
from playbus.actors.store.shardmap import ShardMap

__all__ = ["Rescaler", "ShardControl", "plan"]

log = logging.getLogger("playbus.rescale")


class ShardControl(Protocol):
    def start(self, shards: list[int]) -> None:
        """Start these shards' actors (each owns what the shard map gives it) and wait until they run."""

    def call(self, calls: list[tuple[int, str, tuple[Any, ...]]]) -> list[Any]:
        """Call shard methods concurrently; their answers, or the exception of each that failed."""

    def stop(self, shards: list[int]) -> None:
        """Close these shards' actors (their leases go back) and end them for good."""


def plan(owners: list[int], target: int) -> dict[tuple[int, int], list[int]]:
    """{(from, to): groups} moving every group to its owner among `target` contiguous shards."""
    new = contiguous_owners(target, len(owners))
    moves: dict[tuple[int, int], list[int]] = {}
    for kg, (a, b) in enumerate(zip(owners, new, strict=True)):
        if a != b:
            moves.setdefault((a, b), []).append(kg)
    return moves


class Rescaler:
    def __init__(self, shard_map: ShardMap, control: ShardControl,
                 progress: Callable[[str], None] = lambda _m: None) -> None:
        self.map = shard_map
        self.control = control
        self.progress = progress

    def run(self, target: int) -> dict[str, Any]:
        """Rescale to `target` shards; the figures (also kept in the map as "last")."""
        layout = self.map.read()
        if layout is None:
            raise ValueError("no shard map: the cluster has not started")
        t0 = time.monotonic()
        before = layout.shards
        moves = plan(layout.owners, target)
        moved = sum(len(g) for g in moves.values())
        self.progress(f"rescaling from {layout.count} to {target} shards: {moved} of {len(layout.owners)} key groups "
                      f"move")
        if target > before:
            self.control.start(list(range(before, target)))
        self.map.move_all(contiguous_owners(target, len(layout.owners)))
        losing: dict[int, list[int]] = {}
        gaining: dict[int, list[int]] = {}
        for (a, b), groups in moves.items():
            losing.setdefault(a, []).extend(groups)
            gaining.setdefault(b, []).extend(groups)
        t_release = time.monotonic()
        released = self.control.call([(a, "release", (sorted(g),)) for a, g in losing.items()])
        problems = [f"shard {a} release: {r}" for a, r in zip(losing, released, strict=True)
                    if isinstance(r, BaseException)]  # its groups are claimed anyway: the epochs fence it
        acquired = self._acquire(gaining)
        pause_ms = (time.monotonic() - t_release) * 1000
        problems += [f"shard {b} acquire: {r}" for b, r in zip(gaining, acquired, strict=True)
                     if isinstance(r, BaseException)]
        users = sum(r.get("users", 0) for r in released if isinstance(r, dict))
        last = {"from": layout.count, "to": target, "moved_groups": moved, "users_dropped": users,
                "pause_ms": round(pause_ms, 1), "seconds": round(time.monotonic() - t0, 3),
                "release_ms": {str(r["shard"]): round(r["ms"], 1) for r in released if isinstance(r, dict)},
                "acquire_ms": {str(r["shard"]): round(r["ms"], 1) for r in acquired if isinstance(r, dict)},
                "problems": problems, "at": time.time()}
        self.map.finish(target, last)
        if target < before:
            self.control.stop(list(range(target, before)))
        last["seconds"] = round(time.monotonic() - t0, 3)
        shards = f"{target} shard" + ("" if target == 1 else "s")
        self.progress(f"rescaled to {shards} in {last['seconds']:.1f} s (groups paused {pause_ms:.0f} ms)"
                      + (f"; problems: {'; '.join(problems)}" if problems else ""))
        return last

    def _acquire(self, gaining: dict[int, list[int]]) -> list[Any]:
        """Acquire, trying a shard that failed (restarting, say) again for a few seconds: until its groups are
        claimed, nobody reads them."""
        results: list[Any] = self.control.call([(b, "acquire", (sorted(g),)) for b, g in gaining.items()])
        for attempt in range(5):
            failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
            if not failed:
                break
            time.sleep(0.5 * (attempt + 1))
            shards = list(gaining)
            again = self.control.call([(shards[i], "acquire", (sorted(gaining[shards[i]]),)) for i in failed])
            for i, r in zip(failed, again, strict=True):
                results[i] = r
        return results
