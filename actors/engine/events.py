"""Validation of incoming events: a bad event gets a reason, never an exception."""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

__all__ = ["MAX_DATA_BYTES", "Event", "check_event"]

MAX_DATA_BYTES = 16 * 1024
MAX_ID = 128
MAX_NAME = 256
MAX_TS = 2**53


class Event(NamedTuple):
    """A valid event; `blob` is `data` as msgpack (False when empty), the form the sandbox reads."""

    id: str
    campaign: str
    user: str
    type: str
    ts: int
    data: dict[str, Any]
    blob: bytes | bool


def _name(raw: dict[str, Any], field: str) -> str | None:
    v = raw.get(field)
    if type(v) is not str or not v or len(v) > MAX_NAME:
        return None
    return v


_pack = msgpack.Packer().pack
_new = tuple.__new__  # builds an Event without NamedTuple's slower keyword-checking constructor
_EMPTY: dict[str, Any] = {}


def check_event(raw: Any, now_ms: int) -> tuple[Event | None, str]:
    """(event, "") for a valid event, else (None, reason). `now_ms` is the default `ts`."""
    # Fast path: the common well-formed event, checked in one expression.
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
                return _new(Event, (eid, campaign, user, etype, ts, _EMPTY, False)), ""
            if type(data) is dict and len(data) < 64:
                if not data:
                    return _new(Event, (eid, campaign, user, etype, ts, data, False)), ""
                try:
                    packed: bytes | None = _pack(data)
                except (TypeError, ValueError, OverflowError):
                    packed = None
                if packed is not None and len(packed) <= MAX_DATA_BYTES:
                    return _new(Event, (eid, campaign, user, etype, ts, data, packed)), ""
    return _check_slow(raw, now_ms)


def _check_slow(raw: Any, now_ms: int) -> tuple[Event | None, str]:
    if type(raw) is not dict:
        return None, f"an event must be an object, got {type(raw).__name__}"
    eid = raw.get("id")
    if type(eid) is not str or not 0 < len(eid) <= MAX_ID:
        return None, f"id: expected a string of 1..{MAX_ID} characters, got {_show(eid)}"
    campaign, user, etype = _name(raw, "campaign"), _name(raw, "user"), _name(raw, "type")
    if campaign is None or user is None or etype is None:
        for field, v in (("campaign", campaign), ("user", user), ("type", etype)):
            if v is None:
                return None, f"{field}: expected a string of 1..{MAX_NAME} characters, got {_show(raw.get(field))}"
    ts = raw.get("ts")
    if ts is None:
        ts = now_ms
    elif type(ts) is not int or not 0 <= ts < MAX_TS:
        return None, f"ts: expected milliseconds since the epoch as a non-negative integer, got {_show(ts)}"
    data = raw.get("data")
    blob: bytes | bool = False
    if data is None:
        data = {}
    elif type(data) is not dict:
        return None, f"data: expected an object, got {type(data).__name__}"
    elif data:
        try:
            packed: bytes = _pack(data)
        except (TypeError, ValueError, OverflowError) as e:
            return None, f"data: cannot be encoded ({e})"
        if len(packed) > MAX_DATA_BYTES:
            return None, f"data: {len(packed)} bytes encoded, at most {MAX_DATA_BYTES} allowed"
        blob = packed
    return Event(eid, campaign, user, etype, ts, data, blob), ""  # type: ignore[arg-type]


def _show(v: Any) -> str:
    if v is None:
        return "nothing"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
