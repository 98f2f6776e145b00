"""The shard map: which shard owns each key group, in Redis, so that every process agrees and a restarted shard
knows its groups after a rescale.

    playbus:{meta}:shards    hash    "owners"     -> msgpack array: the owning shard of each key group
                                     "count"      -> the number of shards (the last rescale's end)
                                     "target"     -> the number of shards asked for (POST /v1/shards)
                                     "generation" -> incremented by every change of "owners" or "count"
                                     "last"       -> JSON: the last rescale (from, to, seconds, pause_ms, moved)

One key, so every change is one atomic command on a single Redis and on a Redis Cluster. The map is written by
the cluster's start (from the config's `shards`) and by a rescale, which moves groups one (from, to) pair at a
time: the new owner is written first, so a shard that restarts half-way takes what the map gives it, and the
fencing epochs settle any overlap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from playbus.actors.engine.keys import contiguous_owners
from playbus.actors.store.errors import StoreError

__all__ = ["SHARD_MAP", "ShardMap", "ShardMapError", "ShardLayout"]

SHARD_MAP = "playbus:{meta}:shards"


class ShardMapError(StoreError):
    """The shard map in Redis cannot be read, or does not fit the configuration."""


@dataclass(frozen=True)
class ShardLayout:
    """One reading of the shard map."""

    owners: list[int]  # owner shard of each key group
    count: int  # shards of the last finished rescale (what /healthz lists)
    target: int  # shards asked for; != count while a rescale is asked for or running
    generation: int
    last: dict[str, Any] | None = None

    def groups_of(self, shard: int) -> list[int]:
        return [kg for kg, s in enumerate(self.owners) if s == shard]

    @property
    def shards(self) -> int:
        """Shards that own groups or are listed: every index a caller may have to reach."""
        return max(self.count, max(self.owners, default=-1) + 1)


class ShardMap:
    """Reads and writes the shard map of one Redis (client: decode_responses=False)."""

    def __init__(self, client: Any, key_groups: int) -> None:
        self.client = client
        self.key_groups = key_groups

    def read(self) -> ShardLayout | None:
        """The map, or None when no cluster start has written one."""
        raw = self.client.hgetall(SHARD_MAP)
        if not raw:
            return None
        fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        try:
            owners = [int(s) for s in msgspec.msgpack.decode(fields["owners"])]
            count = int(fields["count"])
            last = json.loads(fields["last"]) if fields.get("last") else None
            layout = ShardLayout(owners, count, int(fields.get("target") or count), int(fields.get("generation") or 0),
                                 last)
        except (KeyError, ValueError, TypeError, msgspec.DecodeError) as e:
            raise ShardMapError(f"the shard map {SHARD_MAP} cannot be read ({type(e).__name__}: {e}); delete it "
                                f"and start again (it is rewritten from the config's shards)") from None
        if len(owners) != self.key_groups:
            raise ShardMapError(f"the shard map {SHARD_MAP} has {len(owners)} key groups, the config "
                                f"{self.key_groups}")
        return layout

    def generation(self) -> int:
        return int(self.client.hget(SHARD_MAP, "generation") or 0)

    def start(self, count: int) -> ShardLayout:
        """At a cluster's start: every group to the contiguous layout of `count` shards (the config's)."""
        owners = contiguous_owners(count, self.key_groups)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(SHARD_MAP, mapping={"owners": msgspec.msgpack.encode(owners), "count": count, "target": count})
        pipe.hincrby(SHARD_MAP, "generation", 1)
        generation = int(pipe.execute()[-1])
        return ShardLayout(owners, count, count, generation)

    def request(self, count: int) -> ShardLayout:
        """Ask for `count` shards (the cluster's supervisor moves the groups); the map as it stands."""
        if not 1 <= count <= self.key_groups:
            raise ShardMapError(f"count: must be 1..{self.key_groups} (the number of key groups), got {count}")
        layout = self.read()
        if layout is None:
            raise ShardMapError("no shard map: the cluster has not started on this Redis")
        self.client.hset(SHARD_MAP, "target", count)
        return ShardLayout(layout.owners, layout.count, count, layout.generation, layout.last)

    def move_all(self, owners: list[int]) -> int:
        """Write the owner of every group (a rescale, before the shards hand the groups over); the new generation."""
        layout = self.read()
        if layout is None:
            raise ShardMapError("no shard map: the cluster has not started on this Redis")
        if len(owners) != self.key_groups:
            raise ShardMapError(f"{len(owners)} owners for {self.key_groups} key groups")
        return self._write(list(owners), layout.count)

    def finish(self, count: int, last: dict[str, Any]) -> int:
        """The rescale to `count` is done: the count /healthz lists, and its figures."""
        layout = self.read()
        if layout is None:
            raise ShardMapError("no shard map: the cluster has not started on this Redis")
        return self._write(layout.owners, count, last)

    def _write(self, owners: list[int], count: int, last: dict[str, Any] | None = None) -> int:
        pipe = self.client.pipeline(transaction=True)
        mapping: dict[str, Any] = {"owners": msgspec.msgpack.encode(owners), "count": count}
        if last is not None:
            mapping["last"] = json.dumps(last)
        pipe.hset(SHARD_MAP, mapping=mapping)
        pipe.hincrby(SHARD_MAP, "generation", 1)
        return int(pipe.execute()[-1])
