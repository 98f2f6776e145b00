"""The data's layout in Redis: the number of key groups, fixed for the life of the data.

    playbus:{meta}:layout    hash    "key_groups" -> N (written by the first start)
Every user lives in the key group crc32(user key) % N; another N would look every user up in another group,
where their context and dedup ids are not: a start with another N is refused.
"""

from __future__ import annotations

from typing import Any

from playbus.actors.store.errors import StoreError

__all__ = ["LAYOUT", "LayoutError", "check_layout"]

LAYOUT = "playbus:{meta}:layout"


class LayoutError(StoreError):
    """The configuration does not match the layout of the data already in Redis."""


def check_layout(client: Any, key_groups: int) -> None:
    """Record `key_groups` on first use; raise LayoutError if the data was written with another number."""
    client.hsetnx(LAYOUT, "key_groups", key_groups)
    stored = int(client.hget(LAYOUT, "key_groups"))
    if stored != key_groups:
        raise LayoutError(
            f"key_groups: the config says {key_groups}, but the data in this Redis was written with {stored}. "
            f"key_groups is fixed for the life of the data (every user's context and dedup ids live in the "
            f"group their key hashes to): set key_groups: {stored} again, or start on an empty Redis")
