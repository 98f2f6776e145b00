"""Backtests in-process: the active version against a candidate on the same events from the same starting states
(engine.backtest), and the pure parts of recording (store.recorded: which events a batch records, how starting
states are rewound)."""

from __future__ import annotations

import io
import json
from argparse import Namespace
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest

from playbus.actors.engine.backtest import backtest
from playbus.actors.engine.clock import CampaignClock
from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.events import NO_DATA, EventIn, Fired, encode_events
from playbus.actors.engine.state import UserState, encode_snapshot
from playbus.actors.store.recorded import Recorded, ran_rules, starting_states
from playbus.admin_backtest import summary
from playbus.config.schema import Config
from tests.support.configs import T0, make_config

# The active version grants a chance on every second answer; the candidate on every answer (double the chances).
V1 = """
function decide(e, ctx)
  local n = ctx:incr("n", 1)
  if n % 2 == 0 then emit("lottery.grant_chance", {chances = 1}) end
end
"""
V2 = V1.replace("n % 2 == 0", "true")
RULES = [{"id": "quiz", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]}]
CAPS = [{"id": "daily", "action": "lottery.grant_chance", "per_user": 3, "period": "day"}]
BUDGETS = [{"name": "chances", "action": "lottery.grant_chance", "param": "chances", "total": 1_000_000}]
LISTING = [{"name": "quiz", "active": 1, "versions": {1: V1}, "canary": None}]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, {"quiz": V1}, RULES, caps=CAPS, budgets=BUDGETS)


def answers(users: list[str], per_user: int) -> list[dict[str, Any]]:
    """`per_user` answers of each user on one day, user after user."""
    return [{"id": f"{u}-{i}", "campaign": "c1", "user": u, "type": "quiz.answered", "ts": T0 + 1000 * i}
            for u in users for i in range(per_user)]


def test_a_candidate_that_doubles_chances_shows_the_grants_added_and_removed_the_budget_and_the_caps_hit(
        config: Config) -> None:
    events = answers(["u0", "u1", "u2", "u3"], 4)
    # u0 starts at n = 1: V1 grants at n = 2, 4; V2 at 2, 3, 4 and is capped at 5 (3 a day): one event changed.
    # The others start empty: V1 grants at 2, 4; V2 at 1, 2, 3 and is capped at 4 (V1's grant there is removed).
    doc = backtest(config, "quiz", V2, 2, LISTING, events, {"c1\x00u0": msgpack.packb({"n": 1})})
    assert doc["events"] == 16 and doc["users"] == 4 and doc["rejected"] == 0
    assert doc["changed"] == 1 + 3 * 3
    assert doc["grants"]["added"] == {"lottery.grant_chance": 1 + 3 * 2}
    assert doc["grants"]["removed"] == {"lottery.grant_chance": 3}
    assert doc["grants"]["active"] == {"lottery.grant_chance": 8}
    assert doc["grants"]["candidate"] == {"lottery.grant_chance": 12}
    assert doc["budgets"] == {"chances": 4}
    assert doc["spend"] == {"c1": {"chances": {"active": 8, "candidate": 12}}}
    assert doc["caps"]["users"] == 4 and doc["caps"]["released"] == 0
    assert doc["caps"]["examples"][0] == {"campaign": "c1", "user": "u0", "caps": ["daily"]}
    assert doc["refusals"] == {"cap:daily": {"active": 0, "candidate": 4}}
    assert doc["errors"] == {"active": 0, "candidate": 0}
    assert len(doc["examples"]) == 10
    first = doc["examples"][0]  # u0's third answer (n = 3)
    assert first["event"] == {"id": "u0-1", "campaign": "c1", "user": "u0", "type": "quiz.answered",
                              "ts": T0 + 1000}
    assert first["active"] == []
    assert first["candidate"] == [{"rule": "quiz", "type": "lottery.grant_chance", "params": {"chances": 1},
                                   "script_version": 2}]
    removed = next(e for e in doc["examples"] if e["event"]["id"] == "u1-3")
    assert [a["script_version"] for a in removed["active"]] == [1] and removed["candidate"] == []
    assert doc["seconds"] >= 0
    text = summary(doc)
    assert "changed:   10 events" in text and "lottery.grant_chance +7" in text and "chances +4" in text
    assert "4 users would hit a cap" in text


def test_an_identical_candidate_changes_nothing(config: Config) -> None:
    events = answers([f"u{i}" for i in range(50)], 5)
    doc = backtest(config, "quiz", V1, 0, LISTING, events, {})
    assert doc["events"] == 250 and doc["changed"] == 0
    assert doc["grants"]["added"] == {} and doc["grants"]["removed"] == {}
    assert doc["grants"]["active"] == doc["grants"]["candidate"] == {"lottery.grant_chance": 100}
    assert doc["budgets"] == {"chances": 0} and doc["caps"]["users"] == 0 and doc["examples"] == []


def test_starting_cap_counters_count_in_both_runs(config: Config) -> None:
    day = CampaignClock("Asia/Shanghai").day(T0)
    # u1 has had 3 chances today already: neither version can grant it one; u2 had 2: one more each.
    doc = backtest(config, "quiz", V2, 2, LISTING, answers(["u1", "u2"], 2), {},
                   caps={"c1\x00u1": {"daily@day": {day: 3}}, "c1\x00u2": {"daily@day": {day: 2}}})
    assert doc["grants"]["active"] == {"lottery.grant_chance": 1}  # u2's second answer
    assert doc["grants"]["candidate"] == {"lottery.grant_chance": 1}  # u2's first answer
    # u1 is refused under both; u2 only under the candidate (its second answer, after the grant moved first)
    assert doc["caps"]["users"] == 1 and doc["caps"]["examples"][0]["user"] == "u2"
    assert doc["refusals"]["cap:daily"] == {"active": 1, "candidate": 3}
    assert doc["changed"] == 2  # u2: the grant moved from the second answer to the first


def test_a_candidate_that_fails_counts_its_errors_and_removes_the_grants(config: Config) -> None:
    bad = 'function decide(e, ctx) error("boom") end'
    doc = backtest(config, "quiz", bad, 0, LISTING, answers(["u1"], 4), {})
    assert doc["errors"] == {"active": 0, "candidate": 4}
    assert doc["grants"]["removed"] == {"lottery.grant_chance": 2} and doc["changed"] == 2


def test_a_batch_records_each_event_whose_rules_ran_once_with_the_time_it_was_decided_at(config: Config) -> None:
    eng = ShardEngine(config)
    data = msgspec.Raw(msgspec.msgpack.encode({"score": 3}))
    events: list[Any] = [
        EventIn("a", "c1", "u1", "quiz.answered", None, data),  # no ts: decided at now
        {"id": "b", "campaign": "c1", "user": "u2", "type": "quiz.answered", "ts": T0, "data": {"x": 1}},
        {"id": "b", "campaign": "c1", "user": "u2", "type": "quiz.answered", "ts": T0},  # a duplicate
        {"id": "c", "campaign": "c1", "user": "u2", "type": "other.type", "ts": T0},  # no rule on its type
        {"id": "d", "campaign": "nope", "user": "u2", "type": "quiz.answered", "ts": T0},  # rejected
        Fired("t", "c1", "u3", "quiz.answered", T0 + 5, NO_DATA, "cause", 1, "key"),  # not held: a duplicate
    ]
    out = eng.process(events, T0 + 7)
    got = ran_rules(events, out.journal)
    assert [(k, e.id, e.ts) for k, e in got] == [("c1\x00u1", "a", T0 + 7), ("c1\x00u2", "b", T0)]
    assert got[0][1].data == data
    assert msgspec.msgpack.decode(bytes(got[1][1].data)) == {"x": 1}
    decoded = msgspec.msgpack.Decoder(list[EventIn]).decode(encode_events([e for _, e in got]))
    assert [e.id for e in decoded] == ["a", "b"]
    assert ran_rules(events, []) == []
    # A due timer that ran is recorded as the event it carries, without the timer's name.
    fired = Fired("t2", "c1", "u4", "quiz.answered", T0, NO_DATA, "cause", 1, "key")
    [(_, rec)] = ran_rules([fired], [("c1", "u4", "t2", T0)])
    assert type(rec) is EventIn and (rec.cause, rec.depth) == ("cause", 1)


def test_starting_states_rewind_the_keys_written_and_the_grants_counted_in_the_window(config: Config) -> None:
    day = CampaignClock("Asia/Shanghai").day(T0)
    now = encode_snapshot(UserState(caps={"daily@day": {day: 3}}), msgpack.packb({"n": 9, "kept": "x", "new": 1}))
    rec = Recorded([], written={"c1\x00u1": {"n", "new"}}, before={"c1\x00u1": {"n": 6}},
                   grants={"c1\x00u1": [("lottery.grant_chance", T0), ("lottery.grant_chance", T0 + 1)]})
    other = encode_snapshot(UserState(caps={"daily@day": {day: 1}}), msgpack.packb({"n": 2}))
    contexts, caps, bad = starting_states(rec, {"c1\x00u1": now, "c1\x00u2": other, "c1\x00u3": None,
                                                "c1\x00u4": b"junk"}, config)
    assert contexts["c1\x00u1"] == {"n": 6, "kept": "x"}  # "new" was first written in the window
    assert msgpack.unpackb(contexts["c1\x00u2"]) == {"n": 2}  # untouched: passed on as it is
    assert "c1\x00u3" not in contexts and bad == 1
    assert caps == {"c1\x00u1": {"daily@day": {day: 1}}, "c1\x00u2": {"daily@day": {day: 1}}}
    # Without a window (given events), the states are the committed ones.
    contexts, caps, _ = starting_states(None, {"c1\x00u1": now}, config)
    assert msgpack.unpackb(contexts["c1\x00u1"]) == {"n": 9, "kept": "x", "new": 1}
    assert caps == {"c1\x00u1": {"daily@day": {day: 3}}}


def test_the_cli_summary_and_json_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: Config) -> None:
    from playbus import admin_backtest

    doc = backtest(config, "quiz", V2, 2, LISTING, answers(["u1"], 4), {})
    doc["decide_seconds"] = 0.5
    sent: list[Any] = []

    def fake_post(args: Namespace, path: str, body: bytes) -> Any:
        sent.append((path, json.loads(body)))
        return doc

    monkeypatch.setattr(admin_backtest, "_post", fake_post)
    events = tmp_path / "e.jsonl"
    events.write_text("\n".join(json.dumps(e) for e in answers(["u1"], 2)) + "\n")
    out, err = io.StringIO(), io.StringIO()
    args = Namespace(name="quiz", source=None, version=2, events=str(events), last=None, campaign=None, json=False)
    assert admin_backtest.run_backtest(args, out, err) == 0
    assert sent[0][0] == "/v1/scripts/quiz/backtest"
    assert sent[0][1]["candidate"] == {"version": 2} and len(sent[0][1]["events"]) == 2
    assert err.getvalue().startswith("backtesting script quiz: the active version against version 2, on 2 events")
    assert "done in" in err.getvalue()
    assert "changed:" in out.getvalue() and "examples (" in out.getvalue()
    out = io.StringIO()
    args = Namespace(name="quiz", source=None, version=2, events=None, last=500, campaign="c1", json=True)
    assert admin_backtest.run_backtest(args, out, io.StringIO()) == 0
    assert sent[1][1]["recorded"] == {"last": 500, "campaign": "c1"}
    assert json.loads(out.getvalue())["changed"] == doc["changed"]
