"""Routing of events to shards: by the key group of (campaign, user), the same on every ingress."""

from __future__ import annotations

from typing import Any

from actors.keygroups import key_group, shard_of_group

__all__ = ["Router"]


class Router:
    """Splits a request's events into per-shard lists, remembering each event's place in the request."""

    def __init__(self, shards: int, key_groups: int) -> None:
        self.shards = shards
        self.key_groups = key_groups
        self._shard_of = [shard_of_group(kg, shards, key_groups) for kg in range(key_groups)]

    def shard_of(self, campaign: str, user: str) -> int:
        return self._shard_of[key_group(f"{campaign}\x00{user}", self.key_groups)]

    def split(self, events: list[Any]) -> dict[int, tuple[list[int], list[Any]]]:
        """{shard: (positions, events)}. Events without string campaign/user go to shard 0, which rejects them."""
        out: dict[int, tuple[list[int], list[Any]]] = {}
        shard_of, n = self._shard_of, self.key_groups
        for i, e in enumerate(events):
            s = 0
            if type(e) is dict:
                c, u = e.get("campaign"), e.get("user")
                if type(c) is str and type(u) is str:
                    s = shard_of[key_group(f"{c}\x00{u}", n)]
            slot = out.get(s)
            if slot is None:
                out[s] = ([i], [e])
            else:
                slot[0].append(i)
                slot[1].append(e)
        return out
