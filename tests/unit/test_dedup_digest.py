"""The dedup memory's digest: 64 real bits (BLAKE2b). The digest of snapshots before version 4 (two CRC-32s) was
32 bits for ids of one length, and the soak lost a sent event to it: these two ids, a send and a timer of one
user, have the same old digest."""

from __future__ import annotations

from pathlib import Path

import msgspec

from playbus.actors.engine.state import UserState, decode_snapshot, encode_snapshot, event_digest, legacy_digest
from tests.support.configs import FIRST_QUIZ, T0, make_engine

SEND, TIMER = "s-fd0aebaf4e9b232c7004cea7", "t-5f674ee9be923afbc4548688"
RULES = [{"id": "quiz", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]}]


def ev(eid: str) -> dict[str, object]:
    return {"id": eid, "campaign": "c1", "user": "u1", "type": "quiz.answered", "ts": T0}


def test_two_ids_the_old_digest_confused_are_two_events_now(tmp_path: Path) -> None:
    assert legacy_digest(SEND) == legacy_digest(TIMER) and event_digest(SEND) != event_digest(TIMER)
    eng = make_engine(tmp_path, {"quiz": FIRST_QUIZ}, RULES)
    out = eng.process([ev(TIMER), ev(SEND)], T0)
    assert [r["status"] for r in out.results] == ["applied", "applied"]
    assert eng.context("c1", "u1") == {"quiz.answered": 2}


def test_ids_remembered_with_the_old_digest_are_still_duplicates_until_forgotten(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, {"quiz": FIRST_QUIZ}, RULES)
    # A version 3 snapshot: two ids remembered with the old digest.
    old = msgspec.msgpack.encode([3, legacy_digest("e1") + legacy_digest("e2"), bytes(8), [], None, []])
    eng.restore("c1\x00u1", old)
    assert eng.users["c1\x00u1"].legacy == 2
    out = eng.process([ev("e1"), ev("e3"), ev("e2")], T0)
    assert [r["status"] for r in out.results] == ["duplicate", "applied", "duplicate"]
    st = eng.users["c1\x00u1"]
    assert st.seen[16:] == event_digest("e3") and st.legacy == 2
    again, _ = decode_snapshot(eng.snapshot({"c1\x00u1"})["c1\x00u1"])
    assert again.legacy == 2 and again.seen == st.seen
    # Forgetting the two oldest ids forgets the legacy ones: the count follows.
    st.forget_old(keep=1, cutoff_s=2**31, most=1)
    assert st.seen == event_digest("e3") and st.legacy == 0
    # The old digest of a new id is never looked for among new digests.
    fresh = UserState(seen=legacy_digest("x"), stamps=bytes(4))
    assert not fresh.has_seen_legacy("x")
    assert decode_snapshot(encode_snapshot(fresh, None))[0].legacy == 0
