"""Events: their wire form, their validation, and what the engine decides on. A bad event gets a reason, never an
exception.

Between processes an event travels as `EventIn` (msgspec): its fields checked while it is decoded, in C, and its
`data` kept as the raw msgpack map it arrived as, which is also the form the sandbox reads, so `data` is never
decoded nor encoded again on its way to a rule. A batch decodes in one call; when one event of it is bad, the batch
is decoded event by event, so that the bad one is rejected alone with a reason naming its field. Events given as
plain dicts (the dry runs, the tests) take `check_event`'s slower path, with the same rules and messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, NamedTuple

import msgpack
import msgspec

__all__ = ["MAX_DATA_BYTES", "MAX_DEPTH", "NO_DATA", "Event", "EventIn", "Fired", "Rejected", "Replay", "check_event",
           "decode_event_raw", "decode_events", "decode_json_events", "encode_event", "encode_events", "from_gameplays",
           "is_msgpack_array", "is_msgpack_map", "msgpack_array"]

MAX_DATA_BYTES = 16 * 1024
MAX_ID = 128
MAX_NAME = 256
MAX_TS = 2**53
MAX_DEPTH = 8  # a rule run on an event of this chain depth may not send nor set timers

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
_Ts = Annotated[int, msgspec.Meta(ge=0, lt=MAX_TS)]
_Depth = Annotated[int, msgspec.Meta(ge=0, le=MAX_DEPTH)]
NO_DATA = msgspec.Raw(b"")  # an event without data: the default, which encoding omits (only this very object)
_NO_DATA = NO_DATA


class EventIn(msgspec.Struct, omit_defaults=True):
    """An event on the wire (msgpack): `data` is the raw msgpack of its object (empty when absent).

    Events made by rules (`send`, `later`) also carry `cause`, the id of the event whose rule made them, and
    `depth`, their chain depth (0 for an event from a gameplay)."""

    id: _Id
    campaign: _Name
    user: _Name
    type: _Name
    ts: _Ts | None = None
    data: msgspec.Raw = _NO_DATA
    cause: str | None = None
    depth: _Depth = 0


class Fired(EventIn, omit_defaults=True):
    """A due timer as its owner shard fires it: the event a rule's `later` made, and the timer's name (its key, or
    its event id when it has no key). Never read from the input: only the shard's timer firer makes these, and
    the engine decides one only while the user's state still holds that timer (not replaced nor cancelled)."""

    timer: str = ""


class Replay(EventIn, omit_defaults=True):
    """A failed rule run asked to run again (补单): the event as it failed, the rule to run (that rule only, on the
    active version), and the failed-runs entry it replays ("<key group>/<stream entry id>"). Only the admin API
    makes these; a replay that succeeds removes its entry in the same commit, so it runs once."""

    rule: str = ""
    failed: str = ""


class _EventJson(msgspec.Struct):
    """An event as JSON gives it; turned into EventIn (its data packed once) right after decoding."""

    id: _Id
    campaign: _Name
    user: _Name
    type: _Name
    ts: _Ts | None = None
    data: dict[str, Any] | None = None


class Event(NamedTuple):
    """A valid event as the engine decides on it; `blob` is its data as msgpack (False when empty)."""

    id: str
    campaign: str
    user: str
    type: str
    ts: int
    blob: bytes | bool


class Rejected(NamedTuple):
    """An event that cannot be decided: its id (when it has a string one), why, and what arrived."""

    id: str | None
    reason: str
    raw: Any


_pack = msgpack.Packer().pack
_new = tuple.__new__  # builds a NamedTuple without its slower keyword-checking constructor
_encode = msgspec.msgpack.Encoder().encode
_dec_batch = msgspec.msgpack.Decoder(list[EventIn])
_dec_one = msgspec.msgpack.Decoder(EventIn)
_dec_raws = msgspec.msgpack.Decoder(list[msgspec.Raw])
_dec_any = msgspec.msgpack.Decoder()
_dec_json_batch = msgspec.json.Decoder(list[_EventJson])
_dec_json_one = msgspec.json.Decoder(_EventJson)
_dec_json_raws = msgspec.json.Decoder(list[msgspec.Raw])
_dec_json_any = msgspec.json.Decoder()


def is_msgpack_map(raw: bytes | memoryview) -> bool:
    """Whether msgpack bytes start a map (fixmap, map16, map32)."""
    return bool(raw[:1]) and (0x80 <= raw[0] <= 0x8F or raw[0] in (0xDE, 0xDF))


def is_msgpack_array(raw: bytes | memoryview) -> bool:
    """Whether msgpack bytes start an array (fixarray, array16, array32)."""
    return bool(raw[:1]) and (0x90 <= raw[0] <= 0x9F or raw[0] in (0xDC, 0xDD))


def encode_events(events: list[EventIn]) -> bytes:
    """A msgpack array of events (their data embedded as it is)."""
    return _encode(events)


def encode_event(event: EventIn) -> bytes:
    """One event as a msgpack map."""
    return _encode(event)


def msgpack_array(items: list[bytes]) -> bytes:
    """A msgpack array of items that are msgpack already (events kept as they arrived: not decoded and encoded
    again)."""
    n = len(items)
    head = bytes((0x90 | n,)) if n < 16 else (b"\xdc" + n.to_bytes(2, "big") if n < 65536 else b"\xdd" +
                                                n.to_bytes(4, "big"))
    return head + b"".join(items)


def decode_event_raw(raw: bytes) -> EventIn | None:
    """One valid msgpack event (a map), or None when it is anything else (then `decode_events` says why)."""
    if not is_msgpack_map(raw):
        return None
    try:
        e: EventIn = _dec_one.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return None if _data_problem(e.data) else e


def _data_problem(raw: msgspec.Raw | bytes) -> str:
    """Why a raw msgpack `data` is not an object of at most MAX_DATA_BYTES, or ""."""
    data = memoryview(raw)
    if not len(data) or data[0] == 0xC0:  # absent, or nil
        return ""
    if not is_msgpack_map(data):
        return "data: expected an object"
    if len(data) > MAX_DATA_BYTES:
        return f"data: {len(data)} bytes encoded, at most {MAX_DATA_BYTES} allowed"
    return ""


def _reject(raw: Any, fallback: str) -> Rejected:
    """The rejection of one event given as plain data: check_event's reason, else `fallback`."""
    rid = raw.get("id") if type(raw) is dict else None
    reason = check_event(raw, 0)[1] or fallback
    return Rejected(rid if type(rid) is str else None, reason, raw)


def _decode_all(body: bytes, array: bool, batch: Any, raws: Any, one: Callable[[msgspec.Raw], Any]) -> list[Any]:
    """One event or an array of them, in one call when every event is valid, else event by event (`one`), so
    that a bad one is rejected alone with a reason."""
    if not array:
        return [one(msgspec.Raw(body))]
    try:
        return list(batch.decode(body))
    except msgspec.ValidationError:
        return [one(raw) for raw in raws.decode(body)]


def decode_events(body: bytes) -> list[EventIn | Rejected]:
    """The events of a msgpack body (one event, or an array of them), in order, each valid or rejected.
    Raises msgspec.DecodeError when the body is not msgpack at all."""
    events: list[EventIn | Rejected] = _decode_all(body, is_msgpack_array(body), _dec_batch, _dec_raws, _one)
    for i, e in enumerate(events):
        if type(e) is EventIn:
            problem = _data_problem(e.data)
            if problem:
                events[i] = Rejected(e.id, problem, None)
    return events


def _one(raw: msgspec.Raw) -> EventIn | Rejected:
    try:
        return _dec_one.decode(raw)
    except msgspec.ValidationError as e:
        return _reject(_dec_any.decode(raw), _message(e))


def decode_json_events(body: bytes) -> list[EventIn | Rejected]:
    """The events of a JSON body (one event, or an array of them), in order, each valid or rejected.
    Raises msgspec.DecodeError when the body is not JSON at all."""
    parsed = _decode_all(body, body.lstrip()[:1] == b"[", _dec_json_batch, _dec_json_raws, _one_json)
    return [_from_json(e) if type(e) is _EventJson else e for e in parsed]


def _one_json(raw: msgspec.Raw) -> _EventJson | Rejected:
    try:
        return _dec_json_one.decode(raw)
    except msgspec.ValidationError as e:
        return _reject(_dec_json_any.decode(raw), _message(e))


def _from_json(e: _EventJson) -> EventIn | Rejected:
    if not e.data:
        return EventIn(e.id, e.campaign, e.user, e.type, e.ts)
    try:
        data = _encode(e.data)
    except (OverflowError, ValueError, TypeError) as err:
        return Rejected(e.id, f"data: cannot be encoded ({err}): integers must fit in 64 bits", None)
    problem = _data_problem(data)
    if problem:
        return Rejected(e.id, problem, None)
    return EventIn(e.id, e.campaign, e.user, e.type, e.ts, msgspec.Raw(data))


def _message(e: msgspec.ValidationError) -> str:
    """msgspec's message in our form: "field: what was expected"."""
    text = str(e)
    what, _, where = text.partition(" - at `$.")
    field = where.rstrip("`").split(".")[0].split("[")[0] if where else ""
    return f"{field}: {what[0].lower() + what[1:]}" if field else text


def from_gameplays(events: list[Any]) -> list[Any]:
    """The events of an input only gameplays write (HTTP, `playbus:in`): one that carries `cause` or `depth`, which
    playbus sets on the events rules make, is rejected (a producer must not pass its events off as made by rules;
    the input partitions carry both kinds)."""
    for i, e in enumerate(events):
        if type(e) is EventIn and (e.depth or e.cause is not None):
            events[i] = Rejected(e.id, "cause, depth: set by playbus on the events rules make; a gameplay's event "
                                       "has neither", None)
    return events


def check_event(raw: Any, now_ms: int) -> tuple[Event | None, str]:
    """(event, "") for a valid event, else (None, reason). `now_ms` is the default `ts`. An EventIn was checked
    when it was decoded; a dict is checked here."""
    if type(raw) is Rejected:
        return None, raw.reason
    if type(raw) is EventIn or type(raw) is Fired or type(raw) is Replay:
        ts = raw.ts
        wire = bytes(raw.data)  # b"", b"\xc0" (nil) or b"\x80" (an empty map): no data
        return _new(Event, (raw.id, raw.campaign, raw.user, raw.type, now_ms if ts is None else ts,
                            wire if len(wire) > 1 else False)), ""
    # Fast path: the common well-formed dict event, checked in one expression.
    if type(raw) is dict:
        eid, campaign, user, etype = raw.get("id"), raw.get("campaign"), raw.get("user"), raw.get("type")
        ts, data = raw.get("ts", now_ms), raw.get("data")
        if (
            type(eid) is str and 0 < len(eid) <= MAX_ID
            and type(campaign) is str and 0 < len(campaign) <= MAX_NAME
            and type(user) is str and 0 < len(user) <= MAX_NAME
            and type(etype) is str and 0 < len(etype) <= MAX_NAME
            and type(ts) is int and 0 <= ts < MAX_TS
        ):
            if data is None:
                return _new(Event, (eid, campaign, user, etype, ts, False)), ""
            if type(data) is dict and len(data) < 64:
                if not data:
                    return _new(Event, (eid, campaign, user, etype, ts, False)), ""
                try:
                    packed: bytes | None = _pack(data)
                except (TypeError, ValueError, OverflowError):
                    packed = None
                if packed is not None and len(packed) <= MAX_DATA_BYTES:
                    return _new(Event, (eid, campaign, user, etype, ts, packed)), ""
    return _check_slow(raw, now_ms)


def _check_slow(raw: Any, now_ms: int) -> tuple[Event | None, str]:
    if type(raw) is not dict:
        return None, f"an event must be an object, got {type(raw).__name__}"
    eid = raw.get("id")
    if type(eid) is not str or not 0 < len(eid) <= MAX_ID:
        return None, f"id: expected a string of 1..{MAX_ID} characters, got {_show(eid)}"
    for field in ("campaign", "user", "type"):
        v = raw.get(field)
        if type(v) is not str or not v or len(v) > MAX_NAME:
            return None, f"{field}: expected a string of 1..{MAX_NAME} characters, got {_show(v)}"
    ts = raw.get("ts")
    if ts is None:
        ts = now_ms
    elif type(ts) is not int or not 0 <= ts < MAX_TS:
        return None, f"ts: expected milliseconds since the epoch as a non-negative integer, got {_show(ts)}"
    data = raw.get("data")
    blob: bytes | bool = False
    if data is not None and type(data) is not dict:
        return None, f"data: expected an object, got {type(data).__name__}"
    if data:
        try:
            packed: bytes = _pack(data)
        except (TypeError, ValueError, OverflowError) as e:
            return None, f"data: cannot be encoded ({e})"
        if len(packed) > MAX_DATA_BYTES:
            return None, f"data: {len(packed)} bytes encoded, at most {MAX_DATA_BYTES} allowed"
        blob = packed
    return Event(eid, raw["campaign"], raw["user"], raw["type"], ts, blob), ""


def _show(v: Any) -> str:
    if v is None:
        return "nothing"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
