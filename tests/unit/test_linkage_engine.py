"""Rules that reach other users and the future, in the engine alone (no Redis, no Ray): `send`, `later`,
`cancel`, the chain depth, their ids, their journal entries, stale timers, snapshots, and dry runs (LocalRun and
`playbus dry-run`) that process sends and fire timers by their clock."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from playbus.actors.engine.engine import MAX_PENDING_TIMERS, ShardEngine
from playbus.actors.engine.events import EventIn, Fired, Rejected, decode_events, encode_events, from_gameplays
from playbus.actors.engine.keys import derived_event_id, user_key
from playbus.actors.engine.local import LocalRun
from playbus.actors.engine.state import decode_snapshot, encode_snapshot
from playbus.cli import dry_run
from playbus.errors import CliError
from tests.support.configs import T0, ev, make_engine, write_config

HOUR = 3_600_000
SCRIPTS = {
    "helped": 'function decide(e, ctx) ctx:incr("helped", 1) send(e.data.inviter, "assist.credited", '
              '{helper = e.user}) end',
    "credited": 'function decide(e, ctx) local n = ctx:incr("credits", 1) '
                'if n == 2 then emit("lottery.grant_chance", {chances = 3}) end end',
    "arm": 'function decide(e, ctx) later(e.data.delay, "timer.fire", {n = e.data.n}, e.data.key) end',
    "disarm": 'function decide(e, ctx) cancel(e.data.key) end',
    "fire": 'function decide(e, ctx) ctx:incr("fired", 1) ctx:set("last", e.data.n) ctx:set("at", now()) end',
    "echo": 'function decide(e, ctx) ctx:incr("n", 1) send(e.user, "loop.echo", {}) end',
    "bad": 'function decide(e, ctx) ctx:incr("n", 1) local d = e.data.d '
           'if e.data.rep then d = {} for i = 1, e.data.rep do d["k" .. i] = ("y"):rep(4000) end end '
           'send(e.data.to, e.data.kind or "assist.credited", d) end',
    "many": 'function decide(e, ctx) for i = 1, e.data.k do later(1000, "timer.fire", {n = i}) end end',
}
RULES = [
    {"id": "helped", "on": "assist.helped", "script": "helped", "sends": ["assist.credited"]},
    {"id": "credited", "on": "assist.credited", "script": "credited", "emits": ["lottery.grant_chance"]},
    {"id": "arm", "on": "timer.arm", "script": "arm", "sends": ["timer.fire"]},
    {"id": "disarm", "on": "timer.disarm", "script": "disarm"},
    {"id": "fire", "on": "timer.fire", "script": "fire"},
    {"id": "echo_start", "on": "loop.start", "script": "echo", "sends": ["loop.echo"]},
    {"id": "echo", "on": "loop.echo", "script": "echo", "sends": ["loop.echo"]},
    {"id": "bad", "on": "bad.send", "script": "bad", "sends": ["assist.credited"]},
    {"id": "many", "on": "timer.many", "script": "many", "sends": ["timer.fire"]},
]


@pytest.fixture
def engine(tmp_path: Path) -> ShardEngine:
    return make_engine(tmp_path, SCRIPTS, RULES)


def test_send_makes_an_event_for_the_other_user_with_a_deterministic_id_cause_and_depth(engine: ShardEngine) -> None:
    out = engine.process([ev(1, user="h1", type="assist.helped", inviter="inv")], T0)
    assert out.results[0]["status"] == "applied" and out.results[0]["errors"] == []
    assert len(out.sends) == 1
    sender, sent = out.sends[0]
    assert sender == user_key("c1", "h1")
    assert sent.id == derived_event_id("s", "c1", "h1", "e1", "helped", 0) and sent.id.startswith("s-")
    assert (sent.campaign, sent.user, sent.type, sent.ts, sent.cause, sent.depth) == (
        "c1", "inv", "assist.credited", T0, "e1", 1)
    assert msgspec.msgpack.decode(sent.data) == {"helper": "h1"}
    assert out.counts == {"sent": 1}
    [decision] = out.journal
    assert decision["effects"] == [{"send": "inv", "type": "assist.credited", "id": sent.id}]
    # The inviter's rule runs on it like on any event (it travels as msgpack through the input partitions).
    [back] = decode_events(encode_events([sent]))
    assert back == sent
    out2 = engine.process([back], T0)
    assert out2.results[0]["status"] == "applied" and engine.context("c1", "inv") == {"credits": 1}
    # A retry of the same event is a duplicate and sends nothing; the same event on a fresh engine makes the
    # same id (what makes a retried batch exactly once).
    assert engine.process([ev(1, user="h1", type="assist.helped", inviter="inv")], T0).sends == []


def test_same_event_same_sends_on_another_engine(tmp_path: Path) -> None:
    a = make_engine(tmp_path / "a", SCRIPTS, RULES).process([ev(1, user="h1", type="assist.helped", inviter="i")], T0)
    b = make_engine(tmp_path / "b", SCRIPTS, RULES).process([ev(1, user="h1", type="assist.helped", inviter="i")], T0)
    assert a.sends == b.sends and a.journal == b.journal


@pytest.mark.parametrize(("data", "error"), [
    ({"to": 7}, "send('assist.credited'): user must be a string of 1..256 bytes"),
    ({"to": "x" * 257}, "send('assist.credited'): user must be a string of 1..256 bytes"),
    ({"to": "u2", "kind": "lottery.grant_chance"}, "send of 'lottery.grant_chance' is not allowed for rule 'bad' "
                                                    "(sends: assist.credited)"),
    ({"to": "u2", "d": "text"}, "send('assist.credited'): data must be a table"),
    ({"to": "u2", "d": [1, 2]}, "send('assist.credited'): data keys must be strings"),
    ({"to": "u2", "rep": 5}, "send('assist.credited'): data of about 20"),
])
def test_a_bad_send_fails_the_rule_run_and_discards_its_writes(engine: ShardEngine, data: dict[str, Any],
                                                               error: str) -> None:
    out = engine.process([ev(1, type="bad.send", **data)], T0)
    [err] = out.results[0]["errors"]
    assert error in err, err
    assert out.sends == [] and engine.context("c1", "u1") == {}
    assert out.failed[0]["rule"] == "bad"


def test_a_chain_deeper_than_8_is_a_rule_error(engine: ShardEngine) -> None:
    run = LocalRun(engine, T0)
    steps = run.event(ev(1, type="loop.start"))
    assert [s.result["status"] for s in steps] == ["applied"] * 9
    assert [s.event.get("depth", 0) for s in steps] == list(range(9))
    assert all(s.result["errors"] == [] for s in steps[:8])
    [err] = steps[8].result["errors"]
    assert "send: chain depth 8 reached" in err and err.startswith("rule echo: ")
    assert engine.context("c1", "u1") == {"n": 8}  # the 9th run's write was discarded with its send


def test_later_sets_a_timer_later_with_the_same_key_replaces_it_and_cancel_removes_it(engine: ShardEngine) -> None:
    out = engine.process([ev(1, type="timer.arm", delay=HOUR, n=1, key="k"),
                          ev(2, type="timer.arm", delay=2 * HOUR, n=2, key="k"),
                          ev(3, type="timer.arm", delay=HOUR, n=3),
                          ev(4, user="u2", type="timer.arm", delay=HOUR, n=4, key="k"),
                          ev(5, user="u2", type="timer.disarm", key="k"),
                          ev(6, user="u2", type="timer.disarm", key="none")], T0)
    t1, t2, t3, t4 = (derived_event_id("t", "c1", u, f"e{i}", "arm", 0) for u, i in (("u1", 1), ("u1", 2),
                                                                                    ("u1", 3), ("u2", 4)))
    u1, u2 = user_key("c1", "u1"), user_key("c1", "u2")
    assert [(op, k, tid, due) for op, k, tid, due, _ in out.timers] == [
        ("set", u1, t1, T0 + HOUR), ("del", u1, t1, 0), ("set", u1, t2, T0 + 2 * HOUR), ("set", u1, t3, T0 + HOUR),
        ("set", u2, t4, T0 + HOUR), ("del", u2, t4, 0)]
    fired = out.timers[2][4]
    assert isinstance(fired, Fired) and (fired.timer, fired.type, fired.ts, fired.cause, fired.depth) == (
        "k", "timer.fire", T0 + 2 * HOUR, "e2", 1)
    assert engine.timers("c1", "u1") == [{"key": None, "id": t3, "type": "timer.fire", "due": T0 + HOUR},
                                         {"key": "k", "id": t2, "type": "timer.fire", "due": T0 + 2 * HOUR}]
    assert engine.timers("c1", "u2") == []
    assert out.counts == {"timers_set": 4, "timers_cancelled": 1}
    effects = [d["effects"] for d in out.journal]
    assert effects[4] == [{"cancel": "k", "id": t4}] and effects[5] == [{"cancel": "none", "id": None}]
    assert effects[1] == [{"later": "k", "type": "timer.fire", "id": t2, "due": T0 + 2 * HOUR}]


def test_a_fired_timer_runs_once_and_a_replaced_one_is_stale(engine: ShardEngine) -> None:
    out = engine.process([ev(1, type="timer.arm", delay=HOUR, n=1, key="k")], T0)
    first = out.timers[0][4]
    assert first is not None
    engine.process([ev(2, type="timer.arm", delay=HOUR, n=2, key="k")], T0 + 1)
    # The first timer, read before it was replaced, arrives: not decided, its entry removed.
    stale = engine.process([first], T0 + HOUR)
    assert stale.results[0]["status"] == "duplicate" and stale.journal == []
    assert [(op, tid) for op, _, tid, _, _ in stale.timers] == [("del", first.id)]
    assert engine.context("c1", "u1") == {} and len(engine.timers("c1", "u1")) == 1
    second = Fired(**{**msgspec.structs.asdict(first), "id": engine.timers("c1", "u1")[0]["id"],
                      "ts": T0 + 1 + HOUR, "data": msgspec.Raw(msgspec.msgpack.encode({"n": 2}))})
    done = engine.process([second], T0 + HOUR)
    assert done.results[0]["status"] == "applied" and done.counts == {"fired": 1}
    assert engine.context("c1", "u1") == {"fired": 1, "last": 2, "at": T0 + 1 + HOUR}
    assert done.journal[0]["effects"] == [{"fired": "k"}]
    assert engine.timers("c1", "u1") == []
    # Fired again (a resubmission): stale, nothing runs.
    assert engine.process([second], T0 + HOUR).results[0]["status"] == "duplicate"
    assert engine.context("c1", "u1")["fired"] == 1


def test_pending_timers_survive_a_snapshot_and_are_capped_per_user(engine: ShardEngine) -> None:
    engine.process([ev(1, type="timer.arm", delay=HOUR, n=1, key="k")], T0)
    key = user_key("c1", "u1")
    blob = engine.snapshot({key})[key]
    state, _ = decode_snapshot(blob)
    assert state.timers == {"k": (derived_event_id("t", "c1", "u1", "e1", "arm", 0), T0 + HOUR, "timer.fire")}
    assert decode_snapshot(encode_snapshot(state, None))[0].timers == state.timers
    engine.evict(key)
    engine.restore(key, blob)
    assert engine.timers("c1", "u1")[0]["key"] == "k"
    # A user without timers: no timers in the snapshot.
    engine.process([ev(2, user="plain", type="timer.disarm", key="k")], T0)
    assert msgspec.msgpack.decode(engine.snapshot({user_key("c1", "plain")})[user_key("c1", "plain")])[5] is None
    out = engine.process([ev(3, type="timer.many", k=MAX_PENDING_TIMERS)], T0)
    assert len(engine.timers("c1", "u1")) == MAX_PENDING_TIMERS
    [refused] = [r for d in out.journal for r in d["refused"]]
    assert refused["reason"] == f"timers: the user has {MAX_PENDING_TIMERS} timers pending"


def test_local_run_fires_timers_by_the_events_clock_and_at_the_end(engine: ShardEngine) -> None:
    run = LocalRun(engine, T0)
    steps = run.event(ev(1, type="timer.arm", delay=HOUR, n=1, key="k"))
    steps += run.event(ev(2, type="timer.arm", delay=3 * HOUR, n=2))
    assert [s.result["id"] for s in steps] == ["e1", "e2"]
    steps = run.event(ev(3, type="quiz.answered", ts=T0 + 2 * HOUR))  # the first timer is due before it
    assert [(s.result["id"], s.via) for s in steps] == [(derived_event_id("t", "c1", "u1", "e1", "arm", 0), "timer"),
                                                        ("e3", None)]
    assert steps[0].event == {"user": "u1", "type": "timer.fire", "ts": T0 + HOUR, "cause": "e1", "depth": 1}
    assert steps[0].context == {"fired": 1, "last": 1, "at": T0 + HOUR}
    assert run.pending() == 1
    assert run.finish(T0 + 2 * HOUR) == []
    [last] = run.finish()  # the last event's time plus the longest timer set
    assert last.context == {"fired": 2, "last": 2, "at": T0 + 3 * HOUR} and run.pending() == 0


def test_dry_run_prints_sends_and_fired_timers(tmp_path: Path) -> None:
    config = write_config(tmp_path, SCRIPTS, RULES)
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(e) for e in [
        ev(1, user="h1", type="assist.helped", inviter="inv"),
        ev(2, user="h2", type="assist.helped", inviter="inv"),
        ev(3, type="timer.arm", delay=HOUR, n=1, key="k"),
        ev(4, type="timer.arm", delay=HOUR, n=2, key="k2", ts=T0 + 10),
        ev(5, type="timer.disarm", key="k2", ts=T0 + 20),
    ]) + "\n", encoding="utf-8")
    out = io.StringIO()
    assert dry_run(str(config), str(events), None, T0, out) == 0
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["id"][:2], x.get("made", {}).get("via")) for x in lines] == [
        ("e1", None), ("s-", "send"), ("e2", None), ("s-", "send"), ("e3", None), ("e4", None), ("e5", None),
        ("t-", "timer")]
    assert lines[3]["actions"][0]["params"] == {"chances": 3} and lines[3]["context"] == {"credits": 2}
    assert lines[1]["made"] == {"via": "send", "user": "inv", "type": "assist.credited", "ts": T0, "cause": "e1",
                                "depth": 1}
    assert lines[7]["context"] == {"fired": 1, "last": 1, "at": T0 + HOUR}
    # --until before the timer is due: it does not fire.
    out = io.StringIO()
    dry_run(str(config), str(events), None, T0, out, until=str(T0 + HOUR - 1))
    assert len(out.getvalue().splitlines()) == 7
    out = io.StringIO()
    dry_run(str(config), str(events), None, T0, out, until="2026-01-21T22:53:20+08:00")  # T0 + 2 h
    assert len(out.getvalue().splitlines()) == 8
    with pytest.raises(CliError, match="--until: expected milliseconds"):
        dry_run(str(config), str(events), None, T0, io.StringIO(), until="tomorrow")


def test_events_made_by_rules_validate_their_depth() -> None:
    ok = EventIn("s-1", "c1", "u1", "t", T0, cause="e1", depth=8)
    assert decode_events(encode_events([ok])) == [ok]
    [bad] = decode_events(msgspec.msgpack.encode([{"id": "x", "campaign": "c", "user": "u", "type": "t",
                                                    "depth": 9}]))
    assert getattr(bad, "reason", "").startswith("depth:"), bad


def test_a_gameplay_cannot_send_the_types_rules_make(engine: ShardEngine) -> None:
    out = engine.process([ev(1, user="inv", type="assist.credited", helper="me"), ev(2, type="timer.fire", n=1)], T0)
    assert [r["status"] for r in out.results] == ["rejected", "rejected"]
    assert out.results[0]["errors"] == ["type: 'assist.credited' events are made by this campaign's rules (their "
                                        "sends); a gameplay cannot send them"]
    assert engine.context("c1", "inv") == {} and out.journal == []
    # and the ingress refuses events that claim to be made by rules
    made = EventIn("x", "c1", "inv", "assist.credited", T0, cause="e1", depth=1)
    [bad] = from_gameplays([made])
    assert isinstance(bad, Rejected) and bad.reason.startswith("cause, depth: set by playbus")
    assert from_gameplays([ok := EventIn("y", "c1", "u", "quiz.answered", T0)]) == [ok]


def test_events_made_with_no_data_travel_as_valid_msgpack(engine: ShardEngine) -> None:
    """A send or timer without data (Lua nil or {}) encodes without a data field, and decodes back whole."""
    out = engine.process([ev(1, type="loop.start"), ev(2, type="timer.arm", delay=HOUR, n=None)], T0)
    [(_, sent)] = out.sends
    [(_, _, _, _, fired)] = out.timers
    assert fired is not None and len(fired.data) == 0  # {n = nil} is {}: no data either
    assert decode_events(encode_events([sent])) == [sent] and len(sent.data) == 0
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(fired), type=Fired) == fired


def test_a_timer_of_a_campaign_no_longer_configured_is_removed_not_run(tmp_path: Path) -> None:
    gone = Fired("t-x", "old-campaign", "u1", "timer.fire", T0, cause="e1", depth=1, timer="k")
    out = make_engine(tmp_path, SCRIPTS, RULES).process([gone], T0)
    assert out.results[0]["status"] == "rejected" and out.journal == []
    assert out.timers == [("del", user_key("old-campaign", "u1"), "t-x", 0, None)]
