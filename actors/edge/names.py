"""The names of playbus's Ray actors, in one place: the cluster starts them, the ingress and a rescale find them."""

from __future__ import annotations

__all__ = ["NAMESPACE", "shard_name"]

NAMESPACE = "playbus"


def shard_name(i: int) -> str:
    return f"playbus-shard-{i}"
