"""Per-user state kept on the Python side: the dedup window and cap counters, and its snapshot format.

The user's context itself lives in the sandbox (a Lua table); a snapshot joins the two as msgpack bytes.
"""

from __future__ import annotations

from typing import Any
from zlib import crc32

import msgpack

from playbus.actors.engine.errors import StateError

__all__ = ["UserState", "decode_snapshot", "encode_snapshot", "event_digest"]

SNAPSHOT_VERSION = 1
_DIGEST = 8
DIGEST_SEED = 0x5BD1E995


def event_digest(event_id: str) -> bytes:
    """8-byte digest of an event id, the unit of the dedup window (per user, so only that user's own
    ids could ever collide; two CRC-32s with different seeds: stable everywhere and cheap)."""
    b = event_id.encode()
    return (crc32(b) | crc32(b, DIGEST_SEED) << 32).to_bytes(_DIGEST, "little")


class UserState:
    """Recent event digests (newest last, bounded) and cap counters of one (campaign, user)."""

    __slots__ = ("caps", "seen")

    def __init__(self, seen: bytes = b"", caps: dict[int, dict[int, int]] | None = None) -> None:
        self.seen = seen
        self.caps = caps

    def has_seen(self, digest: bytes) -> bool:
        seen = self.seen
        i = seen.find(digest)
        while i != -1:
            if i % _DIGEST == 0:
                return True
            i = seen.find(digest, i + 1)
        return False



def encode_snapshot(state: UserState, context: bytes | None) -> bytes:
    """msgpack [version, seen, caps, context-msgpack-or-nil]."""
    caps = [[i, p, n] for i, periods in sorted(state.caps.items()) for p, n in sorted(periods.items())] \
        if state.caps else []
    blob: bytes = msgpack.packb([SNAPSHOT_VERSION, state.seen, caps, context], use_bin_type=True)
    return blob


def decode_snapshot(blob: bytes) -> tuple[UserState, bytes | None]:
    """The inverse of encode_snapshot; raises StateError for anything else."""
    try:
        v: Any = msgpack.unpackb(blob, raw=False)
        version, seen, caps, context = v
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad snapshot
        raise StateError(f"cannot decode user snapshot: {e}") from None
    if version != SNAPSHOT_VERSION:
        raise StateError(f"user snapshot version {version!r} is not supported (expected {SNAPSHOT_VERSION})")
    counters: dict[int, dict[int, int]] = {}
    for i, p, n in caps:
        counters.setdefault(int(i), {})[int(p)] = int(n)
    return UserState(bytes(seen), counters or None), context
