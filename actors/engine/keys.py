"""Keys: the formats of a user's key, its key group, a group's Redis prefix and an action's id, in one place.

A stable hash of (campaign, user) picks one of a fixed number of key groups; shards own groups. The number of
groups is fixed for the life of the data (Flink's model): scaling moves whole groups between shards, never
single users, and every Redis key of a group carries its hash tag so one group is one Redis Cluster slot.
Hot loops that inline one of these formats say so with "= keys.<function>".
"""

from __future__ import annotations

from hashlib import blake2b
from zlib import crc32

__all__ = ["action_id", "contiguous_owners", "derived_event_id", "group_prefix", "groups_of_shard", "kg_tag",
           "key_group", "shard_of_group", "split_user_key", "user_key"]


def user_key(campaign: str, user: str) -> str:
    """The key of one (campaign, user)'s state; campaign ids cannot contain NUL, so it splits back unambiguously."""
    return f"{campaign}\x00{user}"


def split_user_key(key: str) -> tuple[str, str]:
    """(campaign, user) of a user key."""
    campaign, _, user = key.partition("\x00")
    return campaign, user


def action_id(campaign: str, user: str, event_id: str, rule: str, index: int) -> str:
    """Deterministic: the same (event, rule, emit index) always yields the same id."""
    h = blake2b(f"{campaign}\x00{user}\x00{event_id}\x00{rule}\x00{index}".encode(), digest_size=12)
    return "a-" + h.hexdigest()


def derived_event_id(kind: str, campaign: str, user: str, event_id: str, rule: str, index: int) -> str:
    """The id of an event a rule made: `kind` "s" (send) or "t" (later); the same (event, rule, index among the
    run's sends and timers) always yields the same id, so a retried batch makes the same events."""
    h = blake2b(f"{kind}\x00{campaign}\x00{user}\x00{event_id}\x00{rule}\x00{index}".encode(), digest_size=12)
    return f"{kind}-{h.hexdigest()}"


def key_group(user_key: str, n: int) -> int:
    """The group (0..n-1) of a user key; crc32 of its UTF-8, so the same on every process and machine."""
    return crc32(user_key.encode()) % n


def shard_of_group(kg: int, shards: int, n: int) -> int:
    """The shard owning group `kg` of `n`: contiguous ranges, sizes differing by at most one."""
    if not 0 <= kg < n:
        raise ValueError(f"key group {kg} is not in 0..{n - 1}")
    if not 1 <= shards <= n:
        raise ValueError(f"shards ({shards}) must be in 1..{n} (the number of key groups)")
    return (kg * shards) // n


def groups_of_shard(shard: int, shards: int, n: int) -> list[int]:
    """The groups owned by `shard` of `shards`, the inverse of shard_of_group: a contiguous range."""
    if not 1 <= shards <= n:
        raise ValueError(f"shards ({shards}) must be in 1..{n} (the number of key groups)")
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    # Smallest kg with kg*shards//n >= shard is ceil(shard*n/shards).
    first = -(-shard * n // shards)
    end = -(-(shard + 1) * n // shards)
    return list(range(first, end))


def contiguous_owners(shards: int, n: int) -> list[int]:
    """The owner of each of `n` groups when `shards` shards own contiguous ranges (a cluster's start layout)."""
    return [shard_of_group(kg, shards, n) for kg in range(n)]


def kg_tag(kg: int) -> str:
    """The Redis Cluster hash tag of a group, e.g. "{kg17}": all keys of a group share one slot."""
    return f"{{kg{kg}}}"


def group_prefix(kg: int) -> str:
    """"playbus:{kg17}:" - the prefix of every Redis key of a group."""
    return f"playbus:{kg_tag(kg)}:"
