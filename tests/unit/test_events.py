"""The wire form of events: a record batch built from events as they arrived decodes as the same batch encoded
whole; one event is checked without being encoded again (the input router's fast road), and whatever is not a
valid msgpack event is left to the slow road that says why."""

from __future__ import annotations

import msgpack
import msgspec
import pytest

from playbus.actors.engine.events import (
    EventIn,
    Rejected,
    decode_event_raw,
    decode_events,
    decode_json_events,
    encode_event,
    msgpack_array,
)


def ev(i: int, **extra: object) -> dict[str, object]:
    return {"id": f"e{i}", "campaign": "c1", "user": f"u{i % 7}", "type": "quiz.answered", "ts": 1769000000000 + i,
            **extra}


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 65535, 65536, 70000])
def test_an_array_of_raw_events_is_the_batch_encoded_whole(n: int) -> None:
    events = [ev(i, data={"k": i}) if i % 3 else ev(i) for i in range(n)]
    raws = [msgpack.packb(e) for e in events]
    assert msgpack_array(raws) == msgpack.packb(events)
    if n <= 1000:
        assert decode_events(msgpack_array(raws)) == decode_events(msgpack.packb(events))


def test_a_valid_event_is_checked_and_passed_on_as_it_arrived() -> None:
    raw = msgpack.packb({**ev(1, data={"correct": True}), "extra": "ignored"})
    e = decode_event_raw(raw)
    assert isinstance(e, EventIn) and (e.id, e.campaign, e.user, e.ts) == ("e1", "c1", "u1", 1769000000001)
    assert msgpack.unpackb(bytes(e.data)) == {"correct": True}
    assert decode_events(msgpack_array([raw])) == [e]
    assert decode_events(encode_event(e)) == [e]


@pytest.mark.parametrize(("body", "slow_road"), [
    (b'{"id": "e1", "campaign": "c1", "user": "u", "type": "t"}', "valid"),  # JSON: the slow road converts it
    (msgpack.packb([ev(1)]), "valid"),  # an array (a record batch), not one event
    (msgpack.packb({"campaign": "c1", "user": "u", "type": "t"}), "id:"),  # no id
    (msgpack.packb({**ev(1), "ts": "yesterday"}), "ts:"),
    (msgpack.packb({**ev(1), "data": [1, 2]}), "data: expected an object"),
    (msgpack.packb({**ev(1), "data": {"blob": "x" * 20_000}}), "data: "),  # too large
    (msgpack.packb(ev(1))[:-3], "not msgpack"),  # cut short
    (b"", "not msgpack"),
    (b"\xc1", "not msgpack"),
])
def test_anything_else_is_left_to_the_slow_road_which_says_why(body: bytes, slow_road: str) -> None:
    assert decode_event_raw(body) is None
    try:
        decoded = decode_json_events(body) if body[:1] == b"{" else decode_events(body)
    except msgspec.DecodeError:
        assert slow_road == "not msgpack"
        return
    assert slow_road != "not msgpack", decoded
    if slow_road == "valid":
        assert [type(d) for d in decoded] == [EventIn]
    else:
        [rejected] = decoded
        assert isinstance(rejected, Rejected) and rejected.reason.startswith(slow_road), rejected
