"""ShardEngine behaviour: validation, dedup, windows, rule order, atomicity, caps, budgets, ids, state."""

from __future__ import annotations

from pathlib import Path

import pytest

from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.keys import action_id
from playbus.actors.engine.state import decode_snapshot
from playbus.scripting.errors import ScriptCompileError
from tests.support.configs import FIRST_QUIZ, T0, ev, make_config, make_engine

ALWAYS = """
function decide(event, ctx)
  ctx:incr("n", 1)
  emit("lottery.grant_chance", {chances = 1})
end
"""
R_FIRST = {"id": "first_quiz", "on": "quiz.answered", "script": "first", "emits": ["lottery.grant_chance"]}
R_ALWAYS = {"id": "always", "on": "quiz.answered", "script": "always", "emits": ["lottery.grant_chance"]}


@pytest.fixture
def first(tmp_path: Path) -> ShardEngine:
    return make_engine(tmp_path, {"first": FIRST_QUIZ}, [R_FIRST])


def test_first_quiz_answer_grants_one_lottery_chance(first: ShardEngine) -> None:
    out = first.process([ev(1), ev(2)], T0)
    assert [r["status"] for r in out.results] == ["applied", "applied"]
    assert len(out.results[0]["actions"]) == 1 and not out.results[1]["actions"]
    a = out.actions[0]
    assert a["type"] == "lottery.grant_chance" and a["params"] == {"chances": 1}
    assert a["cause"] == "e1" and a["rule"] == "first_quiz" and a["script_version"] == 1
    assert a["id"] == action_id("c1", "u1", "e1", "first_quiz", 0)
    assert first.context("c1", "u1") == {"quiz.answered": 2}


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ("not an object", "an event must be an object"),
        ({"campaign": "c1", "user": "u", "type": "t"}, "id: expected a string"),
        ({"id": "x" * 129, "campaign": "c1", "user": "u", "type": "t"}, "id: expected a string of 1..128"),
        ({"id": 7, "campaign": "c1", "user": "u", "type": "t"}, "id: expected a string"),
        ({"id": "a", "user": "u", "type": "t"}, "campaign: expected a string"),
        ({"id": "a", "campaign": "c1", "user": 5, "type": "t"}, "user: expected a string"),
        ({"id": "a", "campaign": "c1", "user": "u"}, "type: expected a string"),
        ({"id": "a", "campaign": "c1", "user": "u", "type": "t", "ts": "soon"}, "ts: expected milliseconds"),
        ({"id": "a", "campaign": "c1", "user": "u", "type": "t", "ts": -1}, "ts: expected milliseconds"),
        ({"id": "a", "campaign": "c1", "user": "u", "type": "t", "ts": True}, "ts: expected milliseconds"),
        ({"id": "a", "campaign": "c1", "user": "u", "type": "t", "data": [1]}, "data: expected an object"),
        ({"id": "a", "campaign": "c1", "user": "u", "type": "t", "data": {"s": "x" * 17000}}, "at most 16384"),
        ({"id": "a", "campaign": "nope", "user": "u", "type": "t"}, "unknown campaign 'nope'"),
    ],
)
def test_bad_event_is_rejected_with_reason_and_neighbours_go_on(first: ShardEngine, event: object, reason: str) -> None:
    out = first.process([ev(1), event, ev(2)], T0)
    assert [r["status"] for r in out.results] == ["applied", "rejected", "applied"]
    assert reason in out.results[1]["errors"][0]
    assert first.context("c1", "u1") == {"quiz.answered": 2}


def test_retried_event_is_duplicate_in_same_and_later_batches(first: ShardEngine) -> None:
    out = first.process([ev(1), ev(1)], T0)
    assert [r["status"] for r in out.results] == ["applied", "duplicate"]
    again = first.process([ev(1)], T0)
    assert again.results[0]["status"] == "duplicate" and not again.actions and not again.journal
    assert first.context("c1", "u1") == {"quiz.answered": 1}


def test_dedup_remembers_at_least_the_last_window_ids_and_forgets_older_ones_past_the_horizon(
        tmp_path: Path) -> None:
    eng = make_engine(tmp_path, {"first": FIRST_QUIZ}, [R_FIRST], dedup_window=3, dedup_horizon="10m")
    eng.process([ev(i) for i in range(4)], T0)
    assert len(eng.users["c1\x00u1"].seen) == 4 * 8  # all received within the horizon: all remembered
    later = T0 + 11 * 60_000  # 11 minutes on: e0..e3 are past the horizon, the last 3 are kept anyway
    out = eng.process([ev(4)], later)
    assert len(eng.users["c1\x00u1"].seen) == 3 * 8
    out = eng.process([ev(2), ev(4), ev(0)], later)
    assert [r["status"] for r in out.results] == ["duplicate", "duplicate", "applied"]


def test_a_retry_within_the_horizon_is_a_duplicate_after_a_thousand_newer_events_with_the_defaults(
        tmp_path: Path) -> None:
    eng = make_engine(tmp_path, {"first": FIRST_QUIZ}, [R_FIRST])  # dedup_window 32, dedup_horizon 10m
    eng.process([ev("first")], T0)
    for b in range(10):  # 1,000 newer events of the same user over the next 9 minutes
        eng.process([ev(f"n{b}-{i}") for i in range(100)], T0 + b * 54_000)
    retry = eng.process([ev("first")], T0 + 9 * 60_000 + 50_000)  # 9 min 50 s after the first attempt
    assert retry.results[0]["status"] == "duplicate"
    eng.process([ev("later")], T0 + 25 * 60_000)  # long after, a new event: only the last 32 ids are kept
    assert len(eng.users["c1\x00u1"].seen) == 32 * 8


def test_dedup_memory_is_bounded_by_dedup_max_ids(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, {"first": FIRST_QUIZ}, [R_FIRST], dedup_window=2, dedup_max_ids=50)
    eng.process([ev(i) for i in range(120)], T0)
    assert len(eng.users["c1\x00u1"].seen) == 50 * 8 and len(eng.users["c1\x00u1"].stamps) == 50 * 4
    out = eng.process([ev(70), ev(69)], T0)  # the oldest of the 50 kept, then one forgotten
    assert [r["status"] for r in out.results] == ["duplicate", "applied"]


def test_event_outside_campaign_window_is_applied_without_rules(first: ShardEngine) -> None:
    before = T0 - 30 * 86_400_000
    out = first.process([ev(1, ts=before)], T0)
    assert out.results[0]["status"] == "applied" and not out.journal and not out.actions
    assert first.context("c1", "u1") == {}
    assert first.process([ev(1, ts=before)], T0).results[0]["status"] == "duplicate"


def test_missing_ts_defaults_to_receive_time(first: ShardEngine) -> None:
    e = ev(1)
    del e["ts"]
    out = first.process([e], T0)
    assert out.journal[0]["ts"] == T0
    out = first.process([dict(ev(2), ts=None)], T0 - 40 * 86_400_000)  # receive time outside the window
    assert out.results[0]["status"] == "applied" and not out.journal


def test_rules_run_in_file_order_and_see_each_others_writes(tmp_path: Path) -> None:
    scripts = {
        "a": 'function decide(e, ctx) ctx:set("order", "a") end',
        "b": 'function decide(e, ctx) ctx:set("order", ctx:get("order") .. "b") end',
    }
    rules = [{"id": "ra", "on": "quiz.answered", "script": "a"}, {"id": "rb", "on": "quiz.answered", "script": "b"}]
    eng = make_engine(tmp_path, scripts, rules)
    out = eng.process([ev(1)], T0)
    assert [j["rule"] for j in out.journal] == ["ra", "rb"]
    assert eng.context("c1", "u1") == {"order": "ab"}


def test_failing_rule_discards_its_writes_and_emits_but_others_go_on(tmp_path: Path) -> None:
    scripts = {
        "bad": 'function decide(e, ctx) ctx:set("bad", 1); emit("lottery.grant_chance", {}); error("boom") end',
        "good": 'function decide(e, ctx) ctx:incr("good", 1) end',
    }
    rules = [
        {"id": "rbad", "on": "quiz.answered", "script": "bad", "emits": ["lottery.grant_chance"]},
        {"id": "rgood", "on": "quiz.answered", "script": "good"},
    ]
    eng = make_engine(tmp_path, scripts, rules)
    out = eng.process([ev(1), ev(2)], T0)
    assert [r["status"] for r in out.results] == ["applied", "applied"]
    assert out.results[0]["errors"] == ["rule rbad: bad:1: boom"]
    assert not out.actions
    assert eng.context("c1", "u1") == {"good": 2}
    assert [f["rule"] for f in out.failed] == ["rbad", "rbad"]
    assert out.failed[0]["event"]["id"] == "e1" and out.failed[0]["error"] == "bad:1: boom"
    bad_entries = [j for j in out.journal if j["rule"] == "rbad"]
    assert all(j["error"] == "bad:1: boom" and j["changes"] == {} and j["actions"] == [] for j in bad_entries)


def test_emit_outside_the_rules_allow_list_is_an_error(tmp_path: Path) -> None:
    scripts = {"s": 'function decide(e, ctx) ctx:set("x", 1); emit("wallet.grant_cash", {amount_cents = 5}) end'}
    eng = make_engine(tmp_path, scripts, [{"id": "r", "on": "quiz.answered", "script": "s",
                                           "emits": ["lottery.grant_chance"]}])
    out = eng.process([ev(1)], T0)
    assert "emit of 'wallet.grant_cash' is not allowed for rule 'r'" in out.results[0]["errors"][0]
    assert not out.actions and eng.context("c1", "u1") == {}


def test_daily_cap_counts_in_campaign_time_zone(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS],
                      caps=[{"action": "lottery.grant_chance", "per_user": 2, "period": "day"}])
    # 2026-01-21 23:30 and 23:50 Shanghai (15:30Z, 15:50Z), then 00:10 on the 22nd (16:10Z).
    d = 1768953600000 + 15 * 3_600_000  # 2026-01-21T15:00:00Z
    evs = [ev(1, ts=d + 30 * 60_000), ev(2, ts=d + 50 * 60_000), ev(3, ts=d + 55 * 60_000), ev(4, ts=d + 70 * 60_000)]
    out = eng.process(evs, T0)
    granted = [len(r["actions"]) for r in out.results]
    assert granted == [1, 1, 0, 1]
    reason = out.journal[2]["refused"][0]["reason"]
    assert reason == "cap:lottery.grant_chance/day/2: at most 2 lottery.grant_chance per user per day"


def test_weekly_and_campaign_caps(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS],
                      caps=[{"action": "lottery.grant_chance", "per_user": 2, "period": "week"},
                            {"action": "lottery.grant_chance", "per_user": 3, "period": "campaign"}])
    day = 86_400_000
    monday = 1769356800000  # 2026-01-26T00:00+08:00, a Monday
    ts = [monday - day, monday - 2 * day, monday - 3 * day, monday, monday + day, monday + 2 * day]
    out = eng.process([ev(i, ts=t) for i, t in enumerate(ts)], T0)
    # week 1: two granted, third refused; week 2: one more (campaign cap 3), then refused.
    assert [len(r["actions"]) for r in out.results] == [1, 1, 0, 1, 0, 0]


def test_budget_is_never_overspent_and_refusal_is_journaled(tmp_path: Path) -> None:
    cash = 'function decide(e, ctx) emit("wallet.grant_cash", {amount_cents = e.data.amount}) end'
    eng = make_engine(tmp_path, {"cash": cash},
                      [{"id": "pay", "on": "task.completed", "script": "cash", "emits": ["wallet.grant_cash"]}],
                      budgets=[{"name": "cash", "action": "wallet.grant_cash", "param": "amount_cents", "total": 250}])
    evs = [ev(i, user=f"u{i}", type="task.completed", amount=100) for i in range(4)]
    evs.append(ev(9, type="task.completed", amount=50))
    out = eng.process(evs, T0)
    assert [len(r["actions"]) for r in out.results] == [1, 1, 0, 0, 1]
    assert out.journal[2]["refused"][0]["reason"] == "budget:cash: cannot cover amount_cents=100"
    assert sum(a["params"]["amount_cents"] for a in out.actions) == 250


def test_budget_param_must_be_a_non_negative_integer(tmp_path: Path) -> None:
    cash = 'function decide(e, ctx) emit("wallet.grant_cash", {amount_cents = e.data.amount}) end'
    eng = make_engine(tmp_path, {"cash": cash},
                      [{"id": "pay", "on": "task.completed", "script": "cash", "emits": ["wallet.grant_cash"]}],
                      budgets=[{"name": "cash", "action": "wallet.grant_cash", "param": "amount_cents", "total": 250}])
    out = eng.process([ev(1, type="task.completed", amount=-5), ev(2, type="task.completed", amount=1.5)], T0)
    for r in out.results:
        assert "budget parameter 'amount_cents' must be a non-negative integer" in r["errors"][0]
    assert not out.actions


def test_action_ids_are_deterministic_across_engines(tmp_path: Path) -> None:
    a = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS]).process([ev(1), ev(2)], T0)
    b = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS]).process([ev(1), ev(2)], T0)
    assert [x["id"] for x in a.actions] == [x["id"] for x in b.actions]
    assert len({x["id"] for x in a.actions}) == 2


def test_journal_entry_has_the_contract_fields(first: ShardEngine) -> None:
    out = first.process([ev(1)], T0)
    j = out.journal[0]
    assert {k: j[k] for k in ("event", "ts", "rule", "script_version", "changes", "error")} == {
        "event": "e1", "ts": T0, "rule": "first_quiz", "script_version": 1,
        "changes": {"quiz.answered": 1}, "error": None,
    }
    assert j["actions"] == out.actions


def test_dirty_tracking_lists_only_changed_users(first: ShardEngine) -> None:
    first.process([ev(1, user="a"), ev(2, user="b")], T0)
    assert first.take_dirty() == {"c1\x00a", "c1\x00b"}
    first.process([ev(1, user="a")], T0)  # duplicate: nothing changes
    assert first.take_dirty() == set()


def test_snapshot_restore_roundtrip_keeps_context_dedup_and_caps(tmp_path: Path) -> None:
    kw = {"caps": [{"action": "lottery.grant_chance", "per_user": 2, "period": "day"}]}
    a = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS], **kw)
    a.process([ev(1), ev(2)], T0)
    snap = a.snapshot()
    assert set(snap) == {"c1\x00u1"} and isinstance(snap["c1\x00u1"], bytes)
    state, ctx = decode_snapshot(snap["c1\x00u1"])
    assert state.caps and ctx is not None
    b = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS], **kw)
    for key, blob in snap.items():
        b.restore(key, blob)
    out = b.process([ev(2), ev(3)], T0)
    assert [r["status"] for r in out.results] == ["duplicate", "applied"]
    assert not out.actions  # the daily cap of 2 was reached before the snapshot
    assert b.context("c1", "u1") == {"n": 3}


def test_evicted_users_slots_are_reused_without_leaking_contexts(tmp_path: Path) -> None:
    """Contexts live in sandbox slots that evicted users give back: a user taking a freed slot starts empty (or
    from its snapshot), and nobody else's context moves."""
    eng = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS])
    eng.process([ev(i, user=f"u{i}") for i in range(6)], T0)
    snap = eng.snapshot()
    for i in (1, 3, 4):
        eng.evict(f"c1\x00u{i}")
    eng.process([ev(10, user="new1"), ev(11, user="new2"), ev(12, user="u0")], T0)
    eng.restore("c1\x00u3", snap["c1\x00u3"])  # back from its snapshot, into whichever slot is free
    eng.process([ev(13, user="u3"), ev(14, user="new3"), ev(15, user="new4")], T0)
    assert [eng.context("c1", u) for u in ("u0", "u2", "u5", "u3", "new1", "new2", "new3", "new4", "u1")] == [
        {"n": 2}, {"n": 1}, {"n": 1}, {"n": 2}, {"n": 1}, {"n": 1}, {"n": 1}, {"n": 1}, {}]
    assert len({st.slot for st in eng.users.values()}) == len(eng.users) == 8


def test_hot_reload_switches_script_version(first: ShardEngine) -> None:
    v2 = first.put_script("first", 'function decide(e, ctx) ctx:set("v", 2) end')
    assert v2 == 2
    first.process([ev(1)], T0)
    assert first.context("c1", "u1") == {"quiz.answered": 1}  # v1 still active
    first.activate("first", 2)
    out = first.process([ev(2)], T0)
    assert out.journal[0]["script_version"] == 2
    assert first.context("c1", "u1") == {"quiz.answered": 1, "v": 2}


def test_bad_new_script_version_is_refused_with_line(first: ShardEngine) -> None:
    with pytest.raises(ScriptCompileError) as e:
        first.put_script("first", "function decide(e, ctx)\n  local x = = 1\nend")
    assert e.value.line == 2 and "first:2:" in str(e.value)
    assert first.scripts.versions("first").keys() == {1}


def test_bad_script_in_config_names_the_script_and_line(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"broken": "function decide(e, ctx)\n  ctx:set(\nend"},
                      [{"id": "r", "on": "quiz.answered", "script": "broken"}])
    with pytest.raises(ScriptCompileError) as e:
        ShardEngine(cfg)
    assert "broken:3:" in str(e.value)


def test_script_helpers_are_deterministic(tmp_path: Path) -> None:
    src = 'function decide(e, ctx) ctx:set("r", random(1000000)); ctx:set("d", today()); ctx:set("t", now()) end'
    runs = []
    for _ in range(2):
        eng = make_engine(tmp_path, {"s": src}, [{"id": "r", "on": "quiz.answered", "script": "s"}])
        eng.process([ev(1), ev(2, user="u2")], T0)
        runs.append((eng.context("c1", "u1"), eng.context("c1", "u2")))
    assert runs[0] == runs[1]
    (c1, c2) = runs[0]
    assert c1["d"] == "2026-01-21" and c1["t"] == T0 and c1["r"] != c2["r"]


def test_event_data_reaches_the_script(tmp_path: Path) -> None:
    src = 'function decide(e, ctx) ctx:set("tier", e.data.tier); ctx:set("tags", e.data.tags) end'
    eng = make_engine(tmp_path, {"s": src}, [{"id": "r", "on": "task.completed", "script": "s"}])
    eng.process([ev(1, type="task.completed", tier="gold", tags=["a", "b"])], T0)
    assert eng.context("c1", "u1") == {"tier": "gold", "tags": ["a", "b"]}


def test_caps_count_each_day_separately_when_days_interleave(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS],
                      caps=[{"action": "lottery.grant_chance", "per_user": 2, "period": "day"}])
    day = 86_400_000
    ts = [T0, T0 + day, T0, T0 + day, T0, T0 + day]  # late events alternate between two local days
    out = eng.process([ev(i, ts=t) for i, t in enumerate(ts)], T0)
    assert [len(r["actions"]) for r in out.results] == [1, 1, 1, 1, 0, 0]


def test_cap_refuses_a_period_older_than_those_counted(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS],
                      caps=[{"action": "lottery.grant_chance", "per_user": 1, "period": "day"}])
    day = 86_400_000
    first = eng.process([ev(i, ts=T0 + i * day) for i in range(1, 9)], T0)  # 8 days counted
    assert sum(len(r["actions"]) for r in first.results) == 8
    late = eng.process([ev(0, ts=T0)], T0)  # a ninth, older day: its count is unknown
    assert late.results[0]["actions"] == []
    assert "older than the 8 counted" in late.journal[0]["refused"][0]["reason"]


def test_dedup_window_holds_the_digests_of_the_applied_ids(first: ShardEngine) -> None:
    from playbus.actors.engine.state import event_digest

    first.process([ev(1), ev(2), ev(1)], T0)
    assert first.users["c1\x00u1"].seen == event_digest("e1") + event_digest("e2")
