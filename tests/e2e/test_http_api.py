"""The HTTP API of CONTRACT.md against the real running system (run_cluster.py, Ray Serve, shards, Redis).

Every test talks to the one session cluster of conftest.py over HTTP (or to its embedded Redis for the
stream ingress). Users are distinct per test so that the tests do not depend on each other's order; a test
that activates another script version puts version 1 back when it ends.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import msgpack
import pytest

from playbus.actors.engine.keys import action_id, derived_event_id
from playbus.actors.service.http_api import IngressCore
from playbus.actors.service.router import Router
from playbus.config.loader import load_config
from tests.e2e.conftest import (
    CAMPAIGN,
    CREDITED,
    FIRST_QUIZ_V1,
    FIRST_QUIZ_V2,
    LOTTERY,
    OPS_TOKEN,
    T0,
    TOKEN,
    Playbus,
    Reply,
    event,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

RESULT_KEYS = {"id", "status", "actions", "errors"}
ACTION_KEYS = {"id", "type", "campaign", "user", "params", "cause", "rule", "script_version"}
DECISION_KEYS = {"event", "ts", "rule", "script_version", "actions", "changes", "error"}
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def chance(user: str, eid: str, chances: int = 1, version: int = 1) -> dict[str, Any]:
    """The action first_quiz emits for the first quiz answer `eid` of `user`."""
    return {"id": action_id(CAMPAIGN, user, eid, "first_quiz", 0), "type": "lottery.grant_chance",
            "campaign": CAMPAIGN, "user": user, "params": {"chances": chances}, "cause": eid,
            "rule": "first_quiz", "script_version": version}


def applied(eid: str, actions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": eid, "status": "applied", "actions": actions or [], "errors": []}


def duplicate(eid: str, actions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A retry's result: the actions of the id's first processing again, nothing new."""
    return {"id": eid, "status": "duplicate", "actions": actions or [], "errors": []}


def results_of(reply: Reply, dry_run: bool = False) -> list[dict[str, Any]]:
    """The results of POST /v1/events (or of a dry run, which also lists the events its rules made)."""
    assert reply.status == 200, (reply.status, reply.body[:500])
    doc = reply.json()
    assert set(doc) == ({"results", "made"} if dry_run else {"results"})
    for r in doc["results"]:
        assert set(r) == RESULT_KEYS, r
    return doc["results"]  # type: ignore[no-any-return]


def users_on_each_shard(prefix: str, shards: int = 2, key_groups: int = 16) -> list[str]:
    """One user name per shard (the routing of CONTRACT: by key group of campaign and user)."""
    router, found = Router(shards, key_groups), {}
    n = 0
    while len(found) < shards:
        user = f"{prefix}-{n}"
        found.setdefault(router.shard_of(CAMPAIGN, user), user)
        n += 1
    return [found[s] for s in range(shards)]


@pytest.fixture(scope="module")
def first_quiz_v2(playbus: Playbus) -> Reply:
    """Version 2 of first_quiz, stored once for the module (PUT)."""
    return playbus.admin("PUT", "/v1/scripts/first_quiz", FIRST_QUIZ_V2)


def script(playbus: Playbus, name: str = "first_quiz") -> dict[str, Any]:
    r = playbus.admin("GET", f"/v1/scripts/{name}")
    assert r.status == 200, r.body
    return r.json()  # type: ignore[no-any-return]


def activate(playbus: Playbus, version: Any, name: str = "first_quiz") -> Reply:
    return playbus.admin("POST", f"/v1/scripts/{name}/activate", {"version": version})


# -- POST /v1/events -------------------------------------------------------------------------------

def test_a_single_json_event_is_applied_once_and_its_retry_is_a_duplicate(playbus: Playbus) -> None:
    e = event("single-1", "u-single")
    assert results_of(playbus.post_events(e)) == [applied("single-1", [chance("u-single", "single-1")])]
    assert results_of(playbus.post_events(e)) == [duplicate("single-1", [chance("u-single", "single-1")])]
    assert playbus.context("u-single") == {"quiz.answered": 1}


def test_an_array_is_answered_in_request_order_across_shards(playbus: Playbus) -> None:
    users = users_on_each_shard("u-order") + users_on_each_shard("u-order2")
    events = [event(f"order-{i}", users[i % len(users)]) for i in range(12)]
    events.insert(5, event("order-0", users[0]))  # a retry inside the same request
    got = results_of(playbus.post_events(events))
    expected = []
    for i in range(12):
        if i == 5:
            expected.append(duplicate("order-0", [chance(users[0], "order-0")]))
        user = users[i % len(users)]
        first = i < len(users)
        expected.append(applied(f"order-{i}", [chance(user, f"order-{i}")] if first else []))
    assert got == expected
    for user in users:
        assert playbus.context(user) == {"quiz.answered": 3}


def test_msgpack_bodies_single_and_array(playbus: Playbus) -> None:
    one = event("mp-1", "u-mp")
    assert results_of(playbus.post_events(one, msgpack_body=True)) == [applied("mp-1", [chance("u-mp", "mp-1")])]
    many = [event("mp-2", "u-mp"), event("mp-1", "u-mp"), {"id": "mp-bad", "campaign": CAMPAIGN}]
    assert results_of(playbus.post_events(many, msgpack_body=True)) == [
        applied("mp-2"),
        duplicate("mp-1", [chance("u-mp", "mp-1")]),
        {"id": "mp-bad", "status": "rejected", "actions": [],
         "errors": ["user: expected a string of 1..256 characters, got nothing"]},
    ]
    assert playbus.context("u-mp") == {"quiz.answered": 2}


BAD_FIELDS: list[tuple[str, Any, str]] = [
    ("id", 7, "id: expected a string of 1..128 characters"),
    ("id", "", "id: expected a string of 1..128 characters"),
    ("id", "x" * 129, "id: expected a string of 1..128 characters"),
    ("id", None, "id: expected a string of 1..128 characters"),
    ("campaign", 5, "campaign: expected a string of 1..256 characters"),
    ("campaign", "", "campaign: expected a string of 1..256 characters"),
    ("campaign", "no-such-campaign", "campaign: unknown campaign 'no-such-campaign'"),
    ("user", None, "user: expected a string of 1..256 characters"),
    ("user", ["u"], "user: expected a string of 1..256 characters"),
    ("user", "u" * 257, "user: expected a string of 1..256 characters"),
    ("type", {"t": 1}, "type: expected a string of 1..256 characters"),
    ("type", False, "type: expected a string of 1..256 characters"),
    ("ts", "1769000000000", "ts: expected milliseconds since the epoch"),
    ("ts", 1.5, "ts: expected milliseconds since the epoch"),
    ("ts", -1, "ts: expected milliseconds since the epoch"),
    ("ts", True, "ts: expected milliseconds since the epoch"),
    ("ts", 2**53, "ts: expected milliseconds since the epoch"),
    ("ts", 2**70, "ts: expected milliseconds since the epoch"),
    ("data", [1], "data: expected an object, got list"),
    ("data", "x", "data: expected an object, got str"),
    ("data", 3, "data: expected an object, got int"),
    ("data", {"blob": "x" * 17_000}, "data: 17"),
    ("data", {"n": 2**70}, "data: cannot be encoded"),
    ("data", {"s": "x" * 2_000_000}, "data: 2000"),
]


def test_invalid_events_are_rejected_with_reasons_and_do_not_affect_valid_neighbours(playbus: Playbus) -> None:
    events: list[Any] = [event("nb-ok-0", "u-nb")]
    for i, (fieldname, value, _) in enumerate(BAD_FIELDS):
        e = event(f"nb-bad-{i}", f"u-nb-bad-{i}")
        e[fieldname] = value
        events.append(e)
    events += [None, 12, "event", [event("nb-nested", "u-nb")], event("nb-ok-1", "u-nb")]
    got = results_of(playbus.post_events(events))
    assert len(got) == len(events)
    assert got[0] == applied("nb-ok-0", [chance("u-nb", "nb-ok-0")])
    assert got[-1] == applied("nb-ok-1")
    for i, (fieldname, value, reason) in enumerate(BAD_FIELDS, start=1):
        r = got[i]
        want_id = value if fieldname == "id" and isinstance(value, str) else (
            None if fieldname == "id" else f"nb-bad-{i - 1}")
        assert r["id"] == want_id, (fieldname, value, r)
        assert r["status"] == "rejected" and r["actions"] == [], (fieldname, r)
        assert len(r["errors"]) == 1 and r["errors"][0].startswith(reason), (fieldname, value, r["errors"])
    kinds = ["NoneType", "int", "str", "list"]
    for r, kind in zip(got[len(BAD_FIELDS) + 1:-1], kinds, strict=True):
        assert r == {"id": None, "status": "rejected", "actions": [],
                     "errors": [f"an event must be an object, got {kind}"]}
    assert playbus.context("u-nb") == {"quiz.answered": 2}
    for i in range(len(BAD_FIELDS)):
        assert playbus.context(f"u-nb-bad-{i}") == {}


def test_unparseable_bodies_are_400(playbus: Playbus) -> None:
    cases = [
        (b"", "application/json", "body is not valid JSON"),
        (b"{not json", "application/json", "body is not valid JSON"),
        (b'[{"id": "a"},', "application/json", "body is not valid JSON"),
        (b'{"id": "\xff\xfe", "campaign": "e2e"}', "application/json", "body is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", "body is not valid JSON"),
        (b"\xc1", "application/msgpack", "body is not valid msgpack"),
        (b"\x92\x01", "application/msgpack", "body is not valid msgpack"),  # truncated array
        (b"\x01\x02", "application/msgpack", "body is not valid msgpack"),  # extra data
        (b"\x91\xa2\xff\xfe", "application/msgpack", "body is not valid msgpack"),  # invalid UTF-8 string
        (b"\x91" * 100_000 + b"\xc0", "application/msgpack", "body is not valid msgpack"),  # nested too deep
        (msgpack.packb([event("x", "u")]), "application/json", "body is not valid JSON"),
    ]
    for body, ctype, message in cases:
        r = playbus.request("POST", "/v1/events", body, {"Content-Type": ctype})
        assert r.status == 400, (body[:40], ctype, r.status, r.body[:300])
        assert r.json()["error"].startswith(message), (body[:40], r.body[:300])


def test_more_than_1000_events_is_413_and_nothing_is_applied(playbus: Playbus) -> None:
    events = [event(f"many-{i}", "u-many") for i in range(1001)]
    for as_msgpack in (False, True):
        r = playbus.post_events(events, msgpack_body=as_msgpack)
        assert r.status == 413, (r.status, r.body[:300])
        assert r.json() == {"error": "1001 events in one request; at most 1000"}
    assert playbus.context("u-many") == {}
    assert results_of(playbus.post_events(events[:1000]))[999] == applied("many-999")


def test_a_body_over_the_size_limit_is_413(playbus: Playbus) -> None:
    big = b"[" + b" " * (21 * 1024 * 1024) + b"]"
    r = playbus.request("POST", "/v1/events", big, {"Content-Type": "application/json"})
    assert r.status == 413, (r.status, r.body[:300])
    # Without a Content-Length (chunked), the size is only known once the body is read.
    chunks = [b"[" + b" " * (1024 * 1024)] + [b" " * (1024 * 1024)] * 20 + [b"]"]
    conn = http.client.HTTPConnection(playbus.host, playbus.port, timeout=60)
    try:
        conn.request("POST", "/v1/events", iter(chunks), {"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 413, (resp.status, body[:300])


def test_hostile_bodies_never_get_a_server_error(playbus: Playbus) -> None:
    two_mb = "x" * (2 * 1024 * 1024)
    deep = [[[[[[[[[[event("deep", "u")]]]]]]]]]]
    wrong_everywhere = {"id": [], "campaign": {}, "user": 1.5, "type": None, "ts": "now", "data": [None]}
    cases: list[tuple[str, bytes, str, int]] = [
        ("empty body", b"", "application/json", 400),
        ("null", b"null", "application/json", 200),
        ("a number", b"42", "application/json", 200),
        ("a huge number", b"9" * 4000, "application/json", 200),
        ("a number too long to parse", b"9" * 5000, "application/json", 400),
        ("NaN", b"NaN", "application/json", 400),  # not JSON (RFC 8259)
        ("Infinity in an event", b'[{"id": "inf", "ts": Infinity}]', "application/json", 400),
        ("true", b"true", "application/json", 200),
        ("empty array", b"[]", "application/json", 200),
        ("empty object", b"{}", "application/json", 200),
        ("nested arrays", json.dumps(deep).encode(), "application/json", 200),
        ("900-deep arrays", b"[" * 900 + b"]" * 900, "application/json", 200),
        ("a 2 MB string", json.dumps(two_mb).encode(), "application/json", 200),
        ("a 2 MB id", json.dumps(event(two_mb, "u")).encode(), "application/json", 200),
        ("wrong types everywhere", json.dumps(wrong_everywhere).encode(), "application/json", 200),
        ("1000 nulls", b"[" + b",".join([b"null"] * 1000) + b"]", "application/json", 200),
        ("invalid UTF-8", b"\xff\xfe\xfd", "application/json", 400),
        ("UTF-16", json.dumps(event("utf16", "u")).encode("utf-16"), "application/json", 400),  # JSON is UTF-8
        ("no content type", json.dumps(event("noct", "u-hostile")).encode(), "", 200),
        ("text/plain", json.dumps(event("plain", "u-hostile")).encode(), "text/plain", 200),
        ("msgpack nil", msgpack.packb(None), "application/msgpack", 200),
        ("msgpack int", msgpack.packb(-(2**63)), "application/msgpack", 200),
        ("msgpack bin", msgpack.packb(b"\x00\xff" * 1000), "application/msgpack", 200),
        ("msgpack ext", msgpack.packb([msgpack.ExtType(5, b"x"), msgpack.Timestamp(3, 0)]), "application/msgpack",
         200),
        ("msgpack int keys", msgpack.packb({1: 2, 3: [4]}), "application/msgpack", 200),
        ("msgpack list as a map key", b"\x81\x91\x01\x02", "application/msgpack", 200),  # valid msgpack
        ("msgpack bin fields", msgpack.packb({"id": b"id", "campaign": b"e2e", "user": b"u", "type": b"t"}),
         "application/msgpack", 200),
        ("msgpack odd data", msgpack.packb(event("mp-odd", "u-hostile-mp", data_bin=b"\xff", t=msgpack.Timestamp(1, 2),
                                                 e=msgpack.ExtType(7, b"zz"))), "application/msgpack", 200),
        ("msgpack 2 MB str", msgpack.packb(two_mb), "application/msgpack", 200),
    ]
    for name, body, ctype, status in cases:
        headers = {"Content-Type": ctype} if ctype else {}
        r = playbus.request("POST", "/v1/events", body, headers)
        assert r.status == status, (name, r.status, r.body[:300])
        if status == 200:
            for res in r.json()["results"]:
                assert set(res) == RESULT_KEYS, (name, res)
                assert res["status"] in ("applied", "rejected"), (name, res)
    # The two valid events sent without a JSON content type were applied.
    assert playbus.context("u-hostile") == {"quiz.answered": 2}
    assert playbus.request("GET", "/healthz").status == 200


def test_unencodable_integers_reject_only_their_event(playbus: Playbus) -> None:
    events = [
        event("int-ok-0", "u-int"),
        {**event("int-ts", "u-int-bad"), "ts": 2**70},
        event("int-data", "u-int-bad", n=2**64),
        {**event("int-extra", "u-int-extra"), "extra": -(2**70)},  # not an event field: ignored
        event("int-ok-1", "u-int"),
    ]
    got = results_of(playbus.post_events(events))
    assert got[0] == applied("int-ok-0", [chance("u-int", "int-ok-0")])
    assert got[4] == applied("int-ok-1")
    assert [(r["id"], r["status"]) for r in got[1:3]] == [("int-ts", "rejected"), ("int-data", "rejected")]
    assert got[3] == applied("int-extra", [chance("u-int-extra", "int-extra")])
    assert got[1]["errors"][0].startswith("ts: expected milliseconds since the epoch")
    assert got[2]["errors"][0].startswith("data: cannot be encoded")
    assert "64 bits" in got[2]["errors"][0]
    assert playbus.context("u-int") == {"quiz.answered": 2}
    assert playbus.context("u-int-bad") == {}


# -- reads -----------------------------------------------------------------------------------------

def test_context_and_decisions_newest_first(playbus: Playbus) -> None:
    user = "u-reads"
    for i in range(3):
        assert results_of(playbus.post_events(event(f"reads-{i}", user, ts=T0 + 1000 * i)))[0]["status"] == "applied"
    r = playbus.request("GET", f"/v1/campaigns/{CAMPAIGN}/users/{user}/context")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {"campaign": CAMPAIGN, "user": user, "context": {"quiz.answered": 3}, "timers": []}

    two = playbus.decisions(user, limit=2)
    assert [d["event"] for d in two] == ["reads-2", "reads-1"]
    for d in two:
        assert DECISION_KEYS <= set(d), d
    assert {k: two[0][k] for k in DECISION_KEYS} == {
        "event": "reads-2", "ts": T0 + 2000, "rule": "first_quiz", "script_version": 1, "actions": [],
        "changes": {"quiz.answered": 3}, "error": None}
    every = playbus.decisions(user, limit=10)
    assert [d["event"] for d in every] == ["reads-2", "reads-1", "reads-0"]
    assert {k: every[2][k] for k in DECISION_KEYS} == {
        "event": "reads-0", "ts": T0, "rule": "first_quiz", "script_version": 1,
        "actions": [chance(user, "reads-0")], "changes": {"quiz.answered": 1}, "error": None}
    assert playbus.decisions(user, limit=0) == []


def test_an_unknown_user_has_empty_context_and_no_decisions(playbus: Playbus) -> None:
    r = playbus.request("GET", f"/v1/campaigns/{CAMPAIGN}/users/nobody-ever/context")
    assert r.status == 200
    assert r.json() == {"campaign": CAMPAIGN, "user": "nobody-ever", "context": {}, "timers": []}
    r = playbus.request("GET", f"/v1/campaigns/{CAMPAIGN}/users/nobody-ever/decisions?limit=5")
    assert r.status == 200
    assert r.json() == {"decisions": []}
    r = playbus.request("GET", "/v1/campaigns/no-such-campaign/users/nobody-ever/context")
    assert r.json() == {"campaign": "no-such-campaign", "user": "nobody-ever", "context": {}, "timers": []}


def test_user_ids_with_reserved_characters_round_trip(playbus: Playbus) -> None:
    user = "50%41 off/é+&?#"
    assert results_of(playbus.post_events(event("odd-user-1", user)))[0]["status"] == "applied"
    r = playbus.request("GET", f"/v1/campaigns/{CAMPAIGN}/users/{quote(user, safe='')}/context")
    assert r.status == 200, r.body
    assert r.json() == {"campaign": CAMPAIGN, "user": user, "context": {"quiz.answered": 1}, "timers": []}
    r = playbus.request("GET", f"/v1/campaigns/{CAMPAIGN}/users/{quote(user, safe='')}/decisions?limit=1")
    assert [d["event"] for d in r.json()["decisions"]] == ["odd-user-1"]


def test_healthz_answers_for_every_shard(playbus: Playbus) -> None:
    r = playbus.request("GET", "/healthz")
    assert r.status == 200
    doc = r.json()
    assert doc["ok"] is True
    assert sorted(s["shard"] for s in doc["shards"]) == [0, 1]


# -- admin: auth -----------------------------------------------------------------------------------

ADMIN_CALLS: list[tuple[str, str, bytes]] = [
    ("GET", "/v1/scripts", b""),
    ("GET", "/v1/scripts/first_quiz", b""),
    ("PUT", "/v1/scripts/first_quiz", FIRST_QUIZ_V2.encode()),
    ("POST", "/v1/scripts/first_quiz/activate", b'{"version": 1}'),
    ("POST", "/v1/scripts/first_quiz/dry-run", json.dumps({"version": 1, "events": [event("x", "u")]}).encode()),
    ("GET", "/v1/audit", b""),
]


def test_admin_refuses_missing_or_wrong_token(playbus: Playbus) -> None:
    before = script(playbus)
    bad_headers: list[dict[str, str]] = [
        {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer "}, {"X-Admin-Token": TOKEN},
    ]
    for method, path, body in ADMIN_CALLS:
        for headers in bad_headers:
            r = playbus.request(method, path, body or None, headers)
            assert r.status == 401, (method, path, headers, r.status, r.body[:200])
            assert "error" in r.json()
    assert script(playbus) == before  # the refused PUT stored nothing, the refused activate changed nothing


def test_admin_refuses_everything_when_the_token_is_unset(playbus: Playbus, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ingress core of the running system's config and Redis, in this process without the variable."""

    async def no_shard(i: int, method: str, args: Any) -> Any:
        raise AssertionError(f"an unauthorised admin call reached shard {i}: {method}")

    core = IngressCore(load_config(playbus.config_path), no_shard, playbus.redis_url)
    before = script(playbus)
    for value in (None, ""):
        if value is None:
            monkeypatch.delenv("PLAYBUS_ADMIN_TOKEN", raising=False)
        else:
            monkeypatch.setenv("PLAYBUS_ADMIN_TOKEN", value)
        for method, path, body in ADMIN_CALLS:
            for auth in ("Bearer ", "Bearer None", f"Bearer {TOKEN}", ""):
                status, _, content = asyncio.run(core.handle(method, path, "", {"authorization": auth}, body))
                assert status == 401, (value, method, path, auth, status, content)
                assert "PLAYBUS_ADMIN_TOKEN is not set" in json.loads(content)["error"]
    assert script(playbus) == before


# -- admin: scripts --------------------------------------------------------------------------------

def test_put_script_stores_version_2(first_quiz_v2: Reply) -> None:
    assert first_quiz_v2.status == 201, first_quiz_v2.body
    assert first_quiz_v2.json() == {"name": "first_quiz", "version": 2}


def test_put_script_with_a_syntax_error_is_422_with_the_line(playbus: Playbus, first_quiz_v2: Reply) -> None:
    bad = 'function decide(event, ctx)\n  local n = ctx:incr("quiz.answered", 1\nend\n'
    r = playbus.admin("PUT", "/v1/scripts/first_quiz", bad)
    assert r.status == 422, (r.status, r.body)
    doc = r.json()
    assert doc["line"] == 3, doc
    assert "first_quiz:3:" in doc["error"], doc
    assert script(playbus)["versions"] == [1, 2]  # nothing stored


def test_get_script_shows_versions_active_and_source(playbus: Playbus, first_quiz_v2: Reply) -> None:
    assert script(playbus) == {"name": "first_quiz", "active": 1, "versions": [1, 2], "source": FIRST_QUIZ_V1,
                              "canary": None}
    listing = playbus.admin("GET", "/v1/scripts")
    assert listing.status == 200
    assert {s["name"]: (s["active"], s["versions"]) for s in listing.json()["scripts"]}["first_quiz"] == (1, [1, 2])
    assert playbus.admin("GET", "/v1/scripts/no_such_script").status == 404


def test_activate_of_a_missing_version_is_422_and_changes_nothing(playbus: Playbus, first_quiz_v2: Reply) -> None:
    for version in (99, 0, -1, "2", None, 2.0):
        r = activate(playbus, version)
        assert r.status == 422, (version, r.status, r.body)
    assert playbus.admin("POST", "/v1/scripts/no_such_script/activate", {"version": 1}).status == 404
    assert script(playbus)["active"] == 1


def test_hostile_admin_bodies_are_4xx_never_server_errors(playbus: Playbus, first_quiz_v2: Reply) -> None:
    quiz = event("hostile-admin", "u-hostile-admin")
    cases: list[tuple[str, str, bytes, int]] = [
        ("POST", "activate", b"", 422),  # no version given
        ("POST", "activate", b"null", 400),
        ("POST", "activate", b"[1]", 400),
        ("POST", "activate", b"42", 400),
        ("POST", "activate", b"{not json", 400),
        ("POST", "activate", b"\x80\x81", 400),
        ("POST", "activate", b'{"version": "\x80"}', 400),
        ("POST", "activate", b'{"version": [2]}', 422),
        ("POST", "activate", b'{"version": true}', 422),
        ("POST", "activate", b'{"version": 1e400}', 422),
        ("POST", "dry-run", b"", 400),
        ("POST", "dry-run", b"null", 400),
        ("POST", "dry-run", b"[1]", 400),
        ("POST", "dry-run", b"{not json", 400),
        ("POST", "dry-run", b"\x80\x81", 400),
        ("POST", "dry-run", b'{"events": "x"}', 400),
        ("POST", "dry-run", b'{"events": [], "source": 5}', 400),
        ("POST", "dry-run", b'{"events": [], "context": [1]}', 400),
        ("POST", "dry-run", json.dumps({"events": [quiz], "context": {"n": 2**70}}).encode(), 400),
        ("POST", "dry-run", json.dumps({"events": [quiz], "version": [1]}).encode(), 422),
        ("POST", "dry-run", json.dumps({"events": [quiz], "version": True}).encode(), 422),
        ("POST", "dry-run", json.dumps({"events": [quiz], "version": "1"}).encode(), 422),
        ("POST", "dry-run", json.dumps({"events": [quiz] * 1001, "version": 1}).encode(), 413),
        ("PUT", "", b"\xff\xfe", 400),
        ("PUT", "", b"x" * 300_000, 413),
        ("PUT", "", b"", 422),
        ("PUT", "", b"x = 1", 422),
        ("PUT", "", b"while true do end", 422),
    ]
    for method, op, body, status in cases:
        path = "/v1/scripts/first_quiz" + (f"/{op}" if op else "")
        r = playbus.admin(method, path, body)
        assert r.status == status, (method, path, body[:60], r.status, r.body[:300])
        assert "error" in r.json(), r.body[:300]
    assert script(playbus)["versions"] == [1, 2]
    assert playbus.context("u-hostile-admin") == {}


def test_activate_switches_every_shard_within_1s(playbus: Playbus, first_quiz_v2: Reply) -> None:
    probes = users_on_each_shard("u-switch")
    try:
        t0 = time.monotonic()
        r = activate(playbus, 2)
        t_returned = time.monotonic()
        assert r.status == 200, r.body
        assert r.json() == {"name": "first_quiz", "active": 2}
        got = results_of(playbus.post_events([event(f"switch-{u}", u) for u in probes]))
        visible = time.monotonic() - t0
        assert got == [applied(f"switch-{u}", [chance(u, f"switch-{u}", chances=2, version=2)]) for u in probes]
        assert visible < 1.0, f"v2 visible {visible:.3f} s after activate (activate took {t_returned - t0:.3f} s)"
        for u in probes:
            (d,) = playbus.decisions(u)
            assert (d["script_version"], d["changes"]) == (2, {"quiz.answered": 1, "quiz.script": "v2"})
        assert script(playbus) == {"name": "first_quiz", "active": 2, "versions": [1, 2], "source": FIRST_QUIZ_V2,
                                   "canary": None}
    finally:
        assert activate(playbus, 1).status == 200
    back = results_of(playbus.post_events([event(f"switch-back-{u}", u) for u in probes]))
    assert back == [applied(f"switch-back-{u}") for u in probes]
    for u in probes:
        assert playbus.decisions(u, limit=1)[0]["script_version"] == 1
        assert playbus.context(u) == {"quiz.answered": 2, "quiz.script": "v2"}


Record = tuple[float, float, list[dict[str, Any]], int, Any]  # sent, answered, events, status, body


async def produce(session: aiohttp.ClientSession, stop: asyncio.Event, records: list[Record],
                  batch_of: Callable[[int], list[dict[str, Any]]], size: int = 20) -> None:
    """A producer posting `size` events a request (batch_of(n): the events from the n-th on) until `stop`,
    recording each request."""
    loop = asyncio.get_running_loop()
    n = 0
    while not stop.is_set():
        evs = batch_of(n)
        n += size
        t_sent = loop.time()
        async with session.post("/v1/events", json=evs) as resp:
            body = await resp.read()
        records.append((t_sent, loop.time(), evs, resp.status, body))
        await asyncio.sleep(0.02)


def test_no_event_fails_or_is_lost_while_activating(playbus: Playbus, first_quiz_v2: Reply) -> None:
    producers, users_per_producer, batch = 2, 40, 20
    records: list[Record] = []
    marks: dict[str, float] = {}

    def swaps(k: int) -> Callable[[int], list[dict[str, Any]]]:
        return lambda n: [event(f"swap-{k}-{n + i}", f"u-swap-{k}-{(n + i) % users_per_producer}")
                          for i in range(batch)]

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        async with aiohttp.ClientSession(playbus.url) as session:
            tasks = [asyncio.create_task(produce(session, stop, records, swaps(k), batch)) for k in range(producers)]
            try:
                await asyncio.sleep(1.0)
                marks["sent"] = loop.time()
                async with session.post("/v1/scripts/first_quiz/activate", json={"version": 2}, headers=ADMIN) as r:
                    marks["status"] = r.status
                marks["returned"] = loop.time()
                await asyncio.sleep(1.0)
            finally:
                stop.set()
                await asyncio.gather(*tasks)

    try:
        asyncio.run(run())
    finally:
        assert activate(playbus, 1).status == 200
    assert marks["status"] == 200
    per_user: Counter[str] = Counter()
    expected_version: dict[str, int | None] = {}
    for t_sent, t_done, evs, status, body in records:
        assert status == 200, (status, body[:300])
        results = json.loads(body)["results"]
        assert [(r["id"], r["status"], r["errors"]) for r in results] == [(e["id"], "applied", []) for e in evs]
        for e in evs:
            per_user[e["user"]] += 1
            expected_version[e["id"]] = 1 if t_done < marks["sent"] else 2 if t_sent > marks["returned"] else None
    before = sum(1 for v in expected_version.values() if v == 1)
    after = sum(1 for v in expected_version.values() if v == 2)
    assert before >= batch and after >= batch, (before, after, len(records))
    assert max(per_user.values()) < 100, "more events per user than the journal keeps: the check would be blind"

    journal: dict[str, list[int]] = defaultdict(list)
    for user, count in per_user.items():
        assert playbus.context(user).get("quiz.answered") == count, user  # applied exactly once each
        for d in playbus.decisions(user, limit=100):
            journal[d["event"]].append(d["script_version"])
    assert set(journal) == set(expected_version), "journal entries missing or extra"
    for eid, versions in journal.items():
        assert len(versions) == 1, (eid, versions)
        assert versions[0] in (1, 2), (eid, versions)
        if expected_version[eid] is not None:
            assert versions[0] == expected_version[eid], (eid, versions, expected_version[eid])


def _lottery_len(playbus: Playbus) -> int:
    with playbus.redis() as r:
        return int(r.xlen(LOTTERY))


def lottery_actions(playbus: Playbus) -> list[dict[str, Any]]:
    with playbus.redis() as r:
        return [json.loads(f[b"action"]) for _, f in r.xrange(LOTTERY)]


def test_dry_run_with_a_stored_version_and_context_has_no_side_effect(playbus: Playbus, first_quiz_v2: Reply) -> None:
    user = "u-dry-version"
    assert results_of(playbus.post_events(event("dryv-real", user)))[0]["status"] == "applied"
    before = (playbus.context(user), playbus.decisions(user), _lottery_len(playbus), script(playbus))
    for version, chances in ((1, 1), (2, 2)):
        req = {"version": version, "context": {"quiz.answered": 0},
               "events": [event("dryv-a", user), event("dryv-b", user), {"id": "dryv-bad"}, event("dryv-real", user)]}
        got = results_of(playbus.admin("POST", "/v1/scripts/first_quiz/dry-run", req), dry_run=True)
        assert got == [
            applied("dryv-a", [chance(user, "dryv-a", chances=chances, version=version)]),
            applied("dryv-b"),
            {"id": "dryv-bad", "status": "rejected", "actions": [],
             "errors": ["campaign: expected a string of 1..256 characters, got nothing"]},
            applied("dryv-real"),  # the private engine has no memory of the real one
        ], version
    assert (playbus.context(user), playbus.decisions(user), _lottery_len(playbus), script(playbus)) == before
    # The dry-run ids were never really applied.
    assert results_of(playbus.post_events(event("dryv-a", user)))[0]["status"] == "applied"


def test_dry_run_with_source_has_no_side_effect(playbus: Playbus, first_quiz_v2: Reply) -> None:
    user = "u-dry-source"
    assert results_of(playbus.post_events(event("drys-real", user)))[0]["status"] == "applied"
    before = (playbus.context(user), playbus.decisions(user), _lottery_len(playbus), script(playbus))
    source = """
function decide(event, ctx)
  local n = ctx:incr("quiz.answered", 1)
  ctx:set("dry.touched", true)
  emit("lottery.grant_chance", {chances = n})
end
"""
    req = {"source": source, "context": {"quiz.answered": 41}, "events": [event("drys-a", user), event("drys-a", user)]}
    got = results_of(playbus.admin("POST", "/v1/scripts/first_quiz/dry-run", req), dry_run=True)
    assert [(r["id"], r["status"], r["errors"]) for r in got] == [
        ("drys-a", "applied", []), ("drys-a", "duplicate", [])]
    (action,) = got[0]["actions"]
    assert set(action) == ACTION_KEYS
    assert (action["id"], action["type"], action["params"], action["cause"], action["rule"]) == (
        action_id(CAMPAIGN, user, "drys-a", "first_quiz", 0), "lottery.grant_chance", {"chances": 42}, "drys-a",
        "first_quiz")
    bad = playbus.admin("POST", "/v1/scripts/first_quiz/dry-run",
                        {"source": "function decide(", "events": [event("drys-b", user)]})
    assert bad.status == 422, (bad.status, bad.body)
    assert (playbus.context(user), playbus.decisions(user), _lottery_len(playbus), script(playbus)) == before
    assert results_of(playbus.post_events(event("drys-a", user)))[0]["status"] == "applied"


def test_dry_run_of_a_missing_version_is_422(playbus: Playbus, first_quiz_v2: Reply) -> None:
    r = playbus.admin("POST", "/v1/scripts/first_quiz/dry-run", {"version": 99, "events": [event("x", "u")]})
    assert r.status == 422, (r.status, r.body)


# -- stream ingress --------------------------------------------------------------------------------

def _wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.05)


def test_stream_ingress_events_update_the_context(playbus: Playbus) -> None:
    user = "u-stream"
    with playbus.redis() as r:
        r.xadd("playbus:in", {"event": json.dumps(event("stream-1", user))})
        r.xadd("playbus:in", {"event": msgpack.packb(event("stream-2", user))})
        r.xadd("playbus:in", {"event": json.dumps(event("stream-1", user))})  # a resend: duplicate
        assert _wait_for(lambda: playbus.context(user) == {"quiz.answered": 2}, 10), playbus.context(user)
        assert _wait_for(lambda: r.xlen("playbus:in") == 0, 10), "stream entries were not consumed"
    assert playbus.context(user) == {"quiz.answered": 2}
    # Routed into the user's partition and read by its shard in the order they were added.
    decisions = playbus.decisions(user)
    assert [d["event"] for d in decisions] == ["stream-2", "stream-1"]  # newest first
    assert [d["actions"] for d in decisions] == [[], [chance(user, "stream-1")]]
    # The same id over HTTP is the same event.
    assert results_of(playbus.post_events(event("stream-1", user))) == [duplicate("stream-1",
                                                                                  [chance(user, "stream-1")])]


def test_malformed_stream_entries_land_in_rejected(playbus: Playbus) -> None:
    with playbus.redis() as r:
        garbage = r.xadd("playbus:in", {"event": b"{not json"}).decode()
        invalid = r.xadd("playbus:in", {"event": json.dumps({"id": "stream-invalid", "campaign": CAMPAIGN})}).decode()
        no_field = r.xadd("playbus:in", {"payload": b"x"}).decode()
        r.xadd("playbus:in", {"event": json.dumps(event("stream-ok", "u-stream-rej"))})

        def rejected() -> dict[str, dict[str, Any]]:
            out = {}
            for _, fields in r.xrange("playbus:rejected"):
                record = json.loads(fields[b"rejected"])
                out[record["entry"]] = record
            return out if {garbage, invalid, no_field} <= set(out) else {}

        found = _wait_for(rejected, 10)
        assert found, f"not all in playbus:rejected: {r.xrange('playbus:rejected')}"
    assert found[garbage]["event"] == "{not json"
    assert found[garbage]["reason"].startswith("event is neither JSON nor msgpack")
    assert found[invalid]["reason"] == "user: expected a string of 1..256 characters, got nothing"
    assert found[invalid]["event"] == {"id": "stream-invalid", "campaign": CAMPAIGN}
    assert found[no_field]["reason"] == 'entry has neither field "events" nor "event"'
    assert _wait_for(lambda: playbus.context("u-stream-rej") == {"quiz.answered": 1}, 10)


def test_a_killed_ingress_replica_is_replaced_on_the_same_port_within_seconds(playbus: Playbus) -> None:
    """Direct ingress: the replica itself listens on the port. Serve replaces a killed replica; the new one must
    get the same port back at once (Serve's port quarantine held it out for 150 s, and Ray's socket without
    SO_REUSEADDR could not bind while the old connections were in TIME_WAIT, 60 s)."""
    import os
    import signal

    import psutil

    [pid] = [p.pid for p in psutil.process_iter(["cmdline"])
             if "ray::ServeReplica:playbus:Ingress" in " ".join(p.info["cmdline"] or ())]
    # Keep-alive connections open at the kill: the server side closes them, so they sit in TIME_WAIT on the port.
    conns = [http.client.HTTPConnection(playbus.host, playbus.port, timeout=10) for _ in range(8)]
    for c in conns:
        c.request("GET", "/healthz")
        c.getresponse().read()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    for c in conns:
        c.close()
    t = time.monotonic()
    status = 0
    while time.monotonic() - t < 30:
        try:
            status = playbus.post_events(event("after-kill-1", "u-after-kill")).status
        except OSError:
            status = 0
        if status == 200:
            break
        time.sleep(0.5)
    assert status == 200, f"no 200 within 30 s of the replica's kill (last status {status})"
    assert playbus.context("u-after-kill") == {"quiz.answered": 1}


def _wait(check: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return got


def test_a_send_credits_another_user_and_timers_fire_show_and_cancel_end_to_end(playbus: Playbus) -> None:
    helps = [event("e2e-help-1", "e2e-h1", "assist.helped", inviter="e2e-inv"),
             event("e2e-help-2", "e2e-h2", "assist.helped", inviter="e2e-inv")]
    assert [r["status"] for r in results_of(playbus.post_events(helps))] == ["applied", "applied"]
    _wait(lambda: playbus.context("e2e-inv").get("assist.credits") == 2, "the inviter's two credits")
    granted = [a for d in playbus.decisions("e2e-inv") for a in d["actions"]]
    assert [(a["type"], a["params"]) for a in granted] == [("lottery.grant_chance", {"chances": 2})]
    [sent] = [e for d in playbus.decisions("e2e-h1") for e in d["effects"]]
    assert sent["send"] == "e2e-inv" and sent["type"] == "assist.credited"
    assert results_of(playbus.post_events(helps))[0]["status"] == "duplicate"
    # A deadline already past fires at once; one in 399 days (the longest delay is 400) is pending until the task
    # is completed.
    far = 399 * 86_400_000
    results_of(playbus.post_events([event("e2e-acc-1", "e2e-t", "task.accepted", task="t1", within_ms=1000),
                                    event("e2e-acc-2", "e2e-t", "task.accepted", task="t2", within_ms=far)]))
    _wait(lambda: playbus.context("e2e-t").get("task.expired") == 1, "the past deadline")
    r = playbus.request("GET", f"/v1/campaigns/{CAMPAIGN}/users/e2e-t/context")
    t2 = derived_event_id("t", CAMPAIGN, "e2e-t", "e2e-acc-2", "accepted", 0)
    assert r.json()["timers"] == [{"key": "task.t2", "id": t2, "type": "task.expired", "due": T0 + far}]
    results_of(playbus.post_events([event("e2e-done-2", "e2e-t", "task.completed", task="t2")]))
    r = playbus.request("GET", f"/v1/campaigns/{CAMPAIGN}/users/e2e-t/context")
    assert r.json()["timers"] == [] and r.json()["context"] == {"task.expired": 1, "task.done": 1}
    cancelled = [e for d in playbus.decisions("e2e-t") for e in d["effects"] if "cancel" in e]
    assert cancelled == [{"cancel": "task.t2", "id": t2}]
    # The admin dry run decides the send in-process and lists it under "made", with no side effect.
    got = playbus.admin("POST", "/v1/scripts/helped/dry-run",
                        {"events": [event("e2e-dry-1", "e2e-dh", "assist.helped", inviter="e2e-dinv")],
                         "context": {"assist.credits": 1}})
    doc = got.json()
    assert [r["status"] for r in doc["results"]] == ["applied"]
    [made] = doc["made"]
    assert made["made"]["via"] == "send" and made["made"]["user"] == "e2e-dinv"
    assert made["context"] == {"assist.credits": 2} and made["actions"][0]["params"] == {"chances": 2}
    assert playbus.context("e2e-dinv") == {}


def test_every_admin_change_is_in_the_audit_log_with_the_label_of_its_token(playbus: Playbus) -> None:
    ops = {"Authorization": f"Bearer {OPS_TOKEN}"}
    r = playbus.request("PUT", "/v1/scripts/audited", b"function decide(e, ctx) end", ops)
    assert r.status == 201, r.body
    version = r.json()["version"]
    assert playbus.admin("POST", "/v1/scripts/audited/activate", {"version": version}).status == 200
    assert playbus.admin("POST", "/v1/scripts/audited/dry-run", {"events": []}).status == 200  # not a change
    r = playbus.request("GET", "/v1/audit?limit=2", None, ops)
    assert r.status == 200, r.body
    newest, before = r.json()["entries"]
    assert (newest["who"], newest["action"], newest["target"], newest["detail"]) == (
        "admin", "script.activate", "audited", {"version": version, "percent": 100,
                                               "previous": {"active": version, "canary": None}})
    assert (before["who"], before["action"], before["target"], before["detail"]["version"]) == (
        "ops", "script.push", "audited", version)
    assert before["ts"] <= newest["ts"] <= time.time() * 1000
    assert playbus.request("GET", "/v1/audit?limit=x", None, ops).status == 400
    assert playbus.request("GET", "/v1/audit", None, {"Authorization": f"Bearer {OPS_TOKEN}x"}).status == 401


# -- admin: operating campaigns --------------------------------------------------------------------
def test_pause_is_a_kill_switch_resume_runs_rules_again_and_both_are_audited(playbus: Playbus) -> None:
    user = "u-paused"
    r = playbus.admin("POST", f"/v1/campaigns/{CAMPAIGN}/pause")
    assert r.status == 200 and r.json() == {"id": CAMPAIGN, "paused": True, "changed": True}, r.body
    try:
        assert playbus.admin("GET", f"/v1/campaigns/{CAMPAIGN}").json()["paused"] is True
        # From the answer on, every shard applies events with no rule run: no action, no context write.
        got = results_of(playbus.post_events([event("paused-1", user), event("paused-2", user)]))
        assert got == [applied("paused-1"), applied("paused-2")]
        assert playbus.context(user) == {} and playbus.decisions(user) == []
        assert playbus.admin("POST", f"/v1/campaigns/{CAMPAIGN}/pause").json()["changed"] is False
    finally:
        r = playbus.admin("POST", f"/v1/campaigns/{CAMPAIGN}/resume")
    assert r.status == 200 and r.json()["paused"] is False
    got = results_of(playbus.post_events([event("paused-3", user)]))
    assert got == [applied("paused-3", [chance(user, "paused-3", version=got[0]["actions"][0]["script_version"])])]
    assert playbus.context(user) == {"quiz.answered": 1}
    assert results_of(playbus.post_events([event("paused-1", user)])) == [duplicate("paused-1")]  # applied before
    entries = playbus.admin("GET", "/v1/audit?limit=5").json()["entries"]
    assert [(e["action"], e["target"]) for e in entries[:2]] == [("campaign.resume", CAMPAIGN),
                                                                 ("campaign.pause", CAMPAIGN)]


def test_stats_count_grants_refusals_runs_and_budgets_and_a_top_up_raises_the_total(playbus: Playbus) -> None:
    before = playbus.admin("GET", f"/v1/campaigns/{CAMPAIGN}/stats").json()
    users = [f"u-stats-{i}" for i in range(5)]
    results_of(playbus.post_events([event(f"stats-{i}", u) for i, u in enumerate(users)]))
    after = playbus.admin("GET", f"/v1/campaigns/{CAMPAIGN}/stats").json()
    assert after["grants"]["lottery.grant_chance"] - before["grants"].get("lottery.grant_chance", 0) == 5
    runs = sum(v["runs"] for v in after["rules"]["first_quiz"].values())
    assert runs - sum(v["runs"] for v in before["rules"].get("first_quiz", {}).values()) == 5
    budget = after["budgets"]["chances"]
    assert budget["total"] == 1_000_000  # as configured (the only top-up of this session is below)
    assert budget["spent"] + budget["left"] == budget["total"]
    granted = sum(a["params"]["chances"] for a in lottery_actions(playbus) if a["type"] == "lottery.grant_chance")
    assert budget["spent"] == granted
    assert set(after["delivery"]) == {"backlog", "dead", "exact"} and after["delivery"]["dead"] == 0
    r = playbus.admin("POST", f"/v1/campaigns/{CAMPAIGN}/budgets/chances/topup", {"amount": 500})
    assert r.status == 200 and r.json() == {"campaign": CAMPAIGN, "budget": "chances", "total": budget["total"] + 500}
    topped = playbus.admin("GET", f"/v1/campaigns/{CAMPAIGN}/stats").json()["budgets"]["chances"]
    assert topped == {"total": budget["total"] + 500, "spent": budget["spent"], "left": budget["left"] + 500}
    for body, status in (({"amount": 0}, 422), ({"amount": "5"}, 422), ({}, 422), (b"{x", 400)):
        assert playbus.admin("POST", f"/v1/campaigns/{CAMPAIGN}/budgets/chances/topup", body).status == status
    assert playbus.admin("POST", f"/v1/campaigns/{CAMPAIGN}/budgets/nope/topup", {"amount": 1}).status == 404
    assert playbus.admin("GET", "/v1/campaigns/nope/stats").status == 404
    assert playbus.admin("PUT", f"/v1/campaigns/{CAMPAIGN}", {}).json()["field"] == "starts"  # validated


def test_a_campaign_created_and_replaced_through_the_api_runs_from_the_next_batch(playbus: Playbus) -> None:
    doc = {"timezone": "UTC", "starts": "2026-01-01T00:00:00+00:00", "ends": "2027-01-01T00:00:00+00:00",
           "rules": [{"id": "live_quiz", "on": "quiz.answered", "script": "first_quiz",
                      "emits": ["lottery.grant_chance"]}]}
    bad = playbus.admin("PUT", "/v1/campaigns/live", {**doc, "rules": [{**doc["rules"][0], "emits": ["x.y"]}]})
    assert bad.status == 422 and bad.json()["field"] == "rules[0].emits[0]", bad.body
    assert "no target for gameplay 'x'" in bad.json()["error"]
    assert playbus.admin("PUT", "/v1/campaigns/live", {**doc, "id": "other"}).status == 422
    assert playbus.admin("PUT", "/v1/campaigns/live", b"[1").status == 400
    r = playbus.admin("PUT", "/v1/campaigns/live", doc)
    assert r.status == 201, r.body
    assert r.json()["id"] == "live" and r.json()["paused"] is False
    quiz = {"id": "live-1", "campaign": "live", "user": "u-live", "type": "quiz.answered", "ts": T0}
    [res] = results_of(playbus.post_events([quiz]))
    assert [(a["campaign"], a["rule"]) for a in res["actions"]] == [("live", "live_quiz")]
    # Replaced: a cap of 0 a day refuses the chance from the next event on.
    capped = {**doc, "caps": [{"id": "none", "action": "lottery.grant_chance", "per_user": 0, "period": "day"}]}
    assert playbus.admin("PUT", "/v1/campaigns/live", capped).status == 200
    [res] = results_of(playbus.post_events([{**quiz, "id": "live-2", "user": "u-live-2"}]))
    assert res["actions"] == []
    got = playbus.admin("GET", "/v1/campaigns/live").json()
    assert got["caps"] == capped["caps"] and got["rules"][0]["script"] == "first_quiz"
    stats = playbus.admin("GET", "/v1/campaigns/live/stats").json()
    assert stats["grants"] == {"lottery.grant_chance": 1} and stats["refusals"] == {"cap:none": 1}
    actions = [e["action"] for e in playbus.admin("GET", "/v1/audit?limit=2").json()["entries"]]
    assert actions == ["campaign.replace", "campaign.create"]


def test_a_push_that_breaks_its_scripts_test_vectors_is_refused(playbus: Playbus) -> None:
    before = script(playbus, "credited")
    greedy = CREDITED.replace("chances = 2", "chances = 3")
    r = playbus.admin("PUT", "/v1/scripts/credited", greedy)
    assert r.status == 422, r.body
    assert "test vectors fail" in r.json()["error"]
    [failure] = r.json()["failures"]
    assert "the second credit grants 2 chances" in failure and '"chances": 3' in failure
    assert script(playbus, "credited") == before  # nothing stored
    r = playbus.admin("PUT", "/v1/scripts/credited", CREDITED + "-- a comment\n")
    assert r.status == 201, r.body


def test_a_canary_runs_for_its_share_of_users_and_the_old_version_rolls_it_back(playbus: Playbus) -> None:
    v1 = 'function decide(e, ctx) emit("lottery.grant_chance", {chances = 1}) end'
    assert playbus.admin("PUT", "/v1/scripts/canary_q", v1).status == 201
    doc = {"timezone": "UTC", "starts": "2026-01-01T00:00:00+00:00", "ends": "2027-01-01T00:00:00+00:00",
           "rules": [{"id": "cq", "on": "quiz.answered", "script": "canary_q", "emits": ["lottery.grant_chance"]}]}
    assert playbus.admin("PUT", "/v1/campaigns/canary", doc).status == 201
    assert playbus.admin("PUT", "/v1/scripts/canary_q", v1.replace("chances = 1", "chances = 2")).status == 201
    r = playbus.admin("POST", "/v1/scripts/canary_q/activate", {"version": 2, "percent": 20})
    assert r.json() == {"name": "canary_q", "active": 1, "canary": {"version": 2, "percent": 20}}, r.body
    assert script(playbus, "canary_q")["canary"] == {"version": 2, "percent": 20.0}
    assert playbus.admin("POST", "/v1/scripts/canary_q/activate", {"version": 2, "percent": 0}).status == 422

    def run(tag: str) -> dict[str, int]:
        evs = [{"id": f"{tag}-{i}", "campaign": "canary", "user": f"cu{i}", "type": "quiz.answered", "ts": T0}
               for i in range(500)]
        out = {}
        for res in results_of(playbus.post_events(evs)):
            [a] = res["actions"]
            assert a["params"]["chances"] == a["script_version"], a
            out[a["user"]] = a["script_version"]
        return out

    first = run("cq-a")
    share = sum(v == 2 for v in first.values()) / 500
    assert 0.14 < share < 0.26, share
    assert run("cq-b") == first  # the same users, the same versions
    assert playbus.admin("POST", "/v1/scripts/canary_q/activate", {"version": 1}).status == 200  # roll back
    assert set(run("cq-c").values()) == {1}
    assert script(playbus, "canary_q")["canary"] is None
    actions = [e["action"] for e in playbus.admin("GET", "/v1/audit?limit=2").json()["entries"]]
    assert actions == ["script.activate", "script.canary"]


def test_failed_runs_are_listed_and_replayed_once_on_the_fixed_version(playbus: Playbus) -> None:
    broken = 'function decide(e, ctx) if not e.data.ok then error("no ok") end emit("lottery.grant_chance", ' \
             '{chances = 1}) end'
    assert playbus.admin("PUT", "/v1/scripts/flaky", broken).status == 201
    doc = {"timezone": "UTC", "starts": "2026-01-01T00:00:00+00:00", "ends": "2027-01-01T00:00:00+00:00",
           "rules": [{"id": "fl", "on": "quiz.answered", "script": "flaky", "emits": ["lottery.grant_chance"]}]}
    assert playbus.admin("PUT", "/v1/campaigns/replayc", doc).status == 201
    evs = [{"id": f"rp-{i}", "campaign": "replayc", "user": f"ru{i}", "type": "quiz.answered", "ts": T0}
           for i in range(4)]
    assert all(r["errors"] for r in results_of(playbus.post_events(evs)))
    listed = playbus.admin("GET", "/v1/failed?campaign=replayc&rule=fl").json()["failed"]
    assert sorted(r["event"]["id"] for r in listed) == [f"rp-{i}" for i in range(4)]
    assert {r["error"] for r in listed} == {"flaky:1: no ok"}
    fixed = broken.replace("if not e.data.ok then error(\"no ok\") end ", "")
    assert playbus.admin("PUT", "/v1/scripts/flaky", fixed).status == 201
    assert playbus.admin("POST", "/v1/scripts/flaky/activate", {"version": 2}).status == 200
    got = playbus.admin("POST", "/v1/failed/replay", {"campaign": "replayc", "rule": "fl"}).json()
    assert (got["found"], got["replayed"], got["failed_again"]) == (4, 4, 0), got
    assert sorted(a["user"] for a in got["actions"]) == [f"ru{i}" for i in range(4)]
    assert {a["script_version"] for a in got["actions"]} == {2}
    again = playbus.admin("POST", "/v1/failed/replay", {"campaign": "replayc"}).json()
    assert (again["found"], again["actions"]) == (0, [])
    assert playbus.admin("GET", "/v1/failed?campaign=replayc").json()["failed"] == []
    granted = [a for a in lottery_actions(playbus) if a["campaign"] == "replayc"]
    assert len(granted) == 4 and len({a["id"] for a in granted}) == 4


def test_a_backtest_compares_a_candidate_on_recorded_traffic_and_changes_nothing(playbus: Playbus) -> None:
    users = [f"u-bt-{i}" for i in range(20)]
    results_of(playbus.post_events([event(f"bt-{u}", u) for u in users]))
    before = (_lottery_len(playbus), script(playbus, "first_quiz"), playbus.context(users[0]))
    greedy = "function decide(event, ctx)\n  local n = ctx:incr(\"quiz.answered\", 1)\n" \
             "  if n == 1 then emit(\"lottery.grant_chance\", {chances = 5}) end\nend\n"
    r = playbus.admin("POST", "/v1/scripts/first_quiz/backtest",
                      {"candidate": {"source": greedy}, "recorded": {"last": 20, "campaign": CAMPAIGN}})
    assert r.status == 200, r.body
    got = r.json()
    assert got["events"] == 20 and got["changed"] == 20, got
    assert got["grants"]["added"] == {"lottery.grant_chance": 20} == got["grants"]["removed"]
    assert got["budgets"]["chances"] > 0 and got["examples"]
    assert (_lottery_len(playbus), script(playbus, "first_quiz"), playbus.context(users[0])) == before
    bad = playbus.admin("POST", "/v1/scripts/first_quiz/backtest", {"candidate": {"version": 99}, "events": []})
    assert bad.status in (404, 422), bad.body


def test_no_event_fails_or_is_lost_while_a_campaign_is_replaced_paused_and_resumed(playbus: Playbus) -> None:
    """Changes while traffic flows: every event answered applied, and a request sent after a change's call
    returned and answered before the next change began is decided by that change."""
    base = {"timezone": "UTC", "starts": "2026-01-01T00:00:00+00:00", "ends": "2027-01-01T00:00:00+00:00",
            "rules": [{"id": "lq", "on": "quiz.answered", "script": "first_quiz", "emits": ["lottery.grant_chance"]}]}
    assert playbus.admin("PUT", "/v1/campaigns/busy", base).status == 201
    capped = {**base, "caps": [{"id": "zero", "action": "lottery.grant_chance", "per_user": 0, "period": "day"}]}
    records: list[Record] = []
    marks: dict[str, float] = {}
    starts: dict[str, float] = {}

    def busy(k: int) -> Callable[[int], list[dict[str, Any]]]:
        return lambda n: [{"id": f"busy-{k}-{n + i}", "campaign": "busy", "user": f"u-busy-{k}-{n + i}",
                           "type": "quiz.answered", "ts": T0} for i in range(20)]

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        async with aiohttp.ClientSession(playbus.url) as session:

            async def change(name: str, method: str, path: str, doc: Any = None) -> None:
                starts[name] = loop.time()
                async with session.request(method, path, json=doc, headers=ADMIN) as r:
                    assert r.status in (200, 201), (name, r.status, await r.read())
                marks[name] = loop.time()
                await asyncio.sleep(0.7)

            tasks = [asyncio.create_task(produce(session, stop, records, busy(k))) for k in range(2)]
            try:
                await asyncio.sleep(0.7)
                await change("capped", "PUT", "/v1/campaigns/busy", capped)
                await change("paused", "POST", "/v1/campaigns/busy/pause")
                await change("resumed", "POST", "/v1/campaigns/busy/resume")
                await change("uncapped", "PUT", "/v1/campaigns/busy", base)
            finally:
                stop.set()
                await asyncio.gather(*tasks)

    asyncio.run(run())
    phases = {"capped": "refused", "paused": "no run", "resumed": "refused", "uncapped": "granted"}
    seen: Counter[str] = Counter()
    order = list(phases)
    for t_sent, t_done, evs, status, body in records:
        assert status == 200, (status, body[:300])
        results = json.loads(body)["results"]
        assert [(r["id"], r["status"]) for r in results] == [(e["id"], "applied") for e in evs]
        after = [name for name in order if marks[name] <= t_sent]
        if not after:
            continue  # sent before the first change
        nxt = order.index(after[-1]) + 1
        if nxt < len(order) and t_done > starts[order[nxt]]:
            continue  # in flight while the next change was made: either may decide it
        want = phases[after[-1]]
        for r in results:
            got = "granted" if r["actions"] else "refused" if playbus_decided(playbus, r["id"]) else "no run"
            assert got == want, (r["id"], after[-1], got, round(t_sent - marks[after[-1]], 3))
            seen[got] += 1
    assert set(seen) == {"refused", "no run", "granted"}, seen


def playbus_decided(playbus: Playbus, eid: str) -> bool:
    """Whether a rule ran on the event (busy campaign): its user has a decision for it."""
    user = "u-busy-" + eid.removeprefix("busy-")
    return any(d["event"] == eid for d in playbus.decisions(user, campaign="busy"))
