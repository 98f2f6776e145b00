"""Per-user state kept on the Python side: the dedup memory and cap counters, and its snapshot format.

The user's context itself lives in the sandbox (a Lua table); a snapshot joins the two as msgpack bytes.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any
from zlib import crc32

import msgspec

from playbus.actors.engine.errors import StateError

__all__ = ["SNAPSHOT_VERSION", "UserState", "decode_snapshot", "encode_snapshot", "event_digest", "legacy_digest",
           "pending_timers"]

SNAPSHOT_VERSION = 4  # 3 added pending timers; 4 the digest of blake2b and how many older (crc32) digests lead
_DIGEST = 8  # bytes per remembered event id
_STAMP = 4  # bytes per receive time (seconds since the epoch, little-endian uint32)
DIGEST_SEED = 0x5BD1E995
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def event_digest(event_id: str) -> bytes:
    """8-byte digest of an event id, the unit of the dedup memory (per user, so only that user's own ids could ever
    collide: BLAKE2b, stable everywhere, 64 bits)."""
    return blake2b(event_id.encode(), digest_size=_DIGEST).digest()


def legacy_digest(event_id: str) -> bytes:
    """The digest snapshots before version 4 kept: two CRC-32s with different seeds. CRC is affine, so for ids of
    one length the second adds nothing to the first: 32 bits, and among thousands of remembered ids of one length
    (made events' ids all have one) a new id was taken for a duplicate about once in 400,000. Still checked against
    the ids remembered before the change, until they are forgotten."""
    b = event_id.encode()
    return (crc32(b) | crc32(b, DIGEST_SEED) << 32).to_bytes(_DIGEST, "little")


class UserState:
    """The dedup memory (event id digests, oldest first, with the second each was received), the cap counters
    ({cap id: {period: count}}) and the pending timers ({name: (event id, due ms, event type)}, the name being
    the timer's key or, without one, its event id) of one (campaign, user); `slot`: where the sandbox keeps its
    context. The timers here are the authority: a due timer fires only while its user's state still holds it."""

    __slots__ = ("caps", "legacy", "seen", "slot", "stamps", "timers")

    def __init__(self, seen: bytes = b"", stamps: bytes = b"", caps: dict[Any, dict[int, int]] | None = None,
                 slot: int = 0, timers: dict[str, tuple[str, int, str]] | None = None, legacy: int = 0) -> None:
        self.seen = seen
        self.stamps = stamps
        self.caps = caps
        self.slot = slot
        self.timers = timers
        self.legacy = legacy  # the first `legacy` digests of `seen` are legacy_digest's (remembered before v4)

    def has_seen(self, digest: bytes) -> bool:
        seen = self.seen
        i = seen.find(digest)
        while i != -1:
            if i % _DIGEST == 0:
                return True
            i = seen.find(digest, i + 1)
        return False

    def has_seen_legacy(self, event_id: str) -> bool:
        """Whether one of the ids remembered with the old digest is this one."""
        old, n = legacy_digest(event_id), self.legacy * _DIGEST
        seen = self.seen
        i = seen.find(old, 0, n)
        while i != -1:
            if i % _DIGEST == 0:
                return True
            i = seen.find(old, i + 1, n)
        return False

    def forget_old(self, keep: int, cutoff_s: int, most: int) -> None:
        """Drop the oldest ids received before `cutoff_s`, keeping at least the last `keep`, and at most `most`."""
        n = len(self.seen) // _DIGEST
        drop = n - most if n > most else 0
        stamps = self.stamps
        while drop < n - keep and int.from_bytes(stamps[drop * _STAMP:(drop + 1) * _STAMP], "little") < cutoff_s:
            drop += 1
        if drop:
            self.seen = self.seen[drop * _DIGEST:]
            self.stamps = stamps[drop * _STAMP:]
            if self.legacy:
                self.legacy = max(0, self.legacy - drop)


def pending_timers(state: UserState) -> list[dict[str, Any]]:
    """A user's pending timers, soonest first: [{"key", "id", "type", "due"}] ("key" None for a timer set without
    one)."""
    if not state.timers:
        return []
    return [{"key": None if name == eid else name, "id": eid, "type": etype, "due": due}
            for name, (eid, due, etype) in sorted(state.timers.items(), key=lambda kv: (kv[1][1], kv[0]))]


def encode_snapshot(state: UserState, context: bytes | None) -> bytes:
    """msgpack [version, seen, stamps, caps [[cap id, period, n], ...], context-msgpack-or-nil], and for version 3
    (a user with pending timers) [[name, event id, due, type], ...] after them."""
    caps = [[i, p, n] for i, periods in sorted(state.caps.items()) for p, n in sorted(periods.items())] \
        if state.caps else []
    timers = [[name, eid, due, etype] for name, (eid, due, etype) in state.timers.items()] if state.timers else None
    return _encode([SNAPSHOT_VERSION, state.seen, state.stamps, caps, context, timers, state.legacy])


def decode_snapshot(blob: bytes) -> tuple[UserState, bytes | None]:
    """The inverse of encode_snapshot; raises StateError for anything else.

    A version 1 snapshot (no receive times, caps counted by position) decodes with every id received at time 0
    and integer cap keys, which the engine maps to the cap at that position of the campaign."""
    try:
        v: Any = _decode(blob)
        timers: Any = ()
        legacy = -1  # before version 4: every remembered digest is a legacy one
        if v[0] == 1:
            version, seen, caps, context = v
            stamps = bytes(_STAMP * (len(seen) // _DIGEST))
        elif v[0] == 2:
            version, seen, stamps, caps, context = v
        elif v[0] == 3:
            version, seen, stamps, caps, context, timers = v
        else:
            version, seen, stamps, caps, context, timers, legacy = v
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad snapshot
        raise StateError(f"cannot decode user snapshot: {e}") from None
    if version not in (1, 2, 3, SNAPSHOT_VERSION):
        raise StateError(f"user snapshot version {version!r} is not supported (expected {SNAPSHOT_VERSION})")
    if len(seen) % _DIGEST or len(stamps) != len(seen) // _DIGEST * _STAMP:
        raise StateError("user snapshot: dedup ids and receive times do not match")
    counters: dict[Any, dict[int, int]] = {}
    for i, p, n in caps:
        counters.setdefault(i, {})[int(p)] = int(n)
    pending = {name: (eid, int(due), etype) for name, eid, due, etype in timers or ()}
    legacy = len(seen) // _DIGEST if legacy < 0 else int(legacy)
    return UserState(bytes(seen), bytes(stamps), counters or None, timers=pending or None, legacy=legacy), context
