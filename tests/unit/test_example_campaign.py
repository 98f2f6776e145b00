"""The example campaign: config/example-events.jsonl through LocalRun (the dry run's engine: sends decided in-process,
timers fired by the events' clock) gives what each rule of config/example.yaml promises; plus small scenarios of
its own for the edges (a check-in a millisecond before or at the streak's expiry, a task completed a millisecond
before or at its deadline, a team list that is not the leader's)."""

from __future__ import annotations

import io
import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.engine import LocalBudgets, ShardEngine
from playbus.actors.engine.local import LocalRun, Step
from playbus.cli import dry_run
from playbus.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "config"
NOW_MS = 1_769_900_000_000  # receive time; every example event carries its own ts
CAMPAIGN = "spring2026"
TZ = timezone(timedelta(hours=8))  # Asia/Shanghai, the campaign's time zone
HOUR = 3_600_000
DAY = 24 * HOUR


def at(text: str) -> int:
    """ms of a local campaign time "MM-DD HH:MM[:SS.fff]" in 2026."""
    fmt = "%Y-%m-%d %H:%M:%S.%f" if text.count(":") == 2 else "%Y-%m-%d %H:%M"
    return int(datetime.strptime(f"2026-{text}", fmt).replace(tzinfo=TZ).timestamp() * 1000)


def load_events() -> list[dict[str, Any]]:
    with open(CONFIG / "example-events.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Run:
    """Events through LocalRun on one engine, every step kept, and the journal of every batch."""

    def __init__(self, events: list[dict[str, Any]], until_ms: int | None = None) -> None:
        self.engine = ShardEngine(load_config(CONFIG / "example.yaml"))
        self.local = LocalRun(self.engine, NOW_MS)
        self.journal = self.local.journal
        self.steps: list[Step] = []
        for e in events:
            self.steps += self.local.event(e)
        self.steps += self.local.finish(until_ms)

    # -- input events, by id ------------------------------------------------------------------------
    def result(self, event_id: str, nth: int = 0) -> dict[str, Any]:
        return [s.result for s in self.steps if s.result["id"] == event_id][nth]

    def granted(self, event_id: str, nth: int = 0) -> list[tuple[str, dict[str, Any]]]:
        r = self.result(event_id, nth)
        assert r["status"] == "applied", r
        assert list(r["errors"]) == [], r
        return [(a["type"], a["params"]) for a in r["actions"]]

    def refused(self, event_id: str) -> list[tuple[str, str]]:
        return [(x["type"], x["reason"]) for j in self.journal if j["event"] == event_id for x in j["refused"]]

    # -- events the rules made ----------------------------------------------------------------------
    def made(self, cause: str | None = None, type: str | None = None) -> list[Step]:
        return [s for s in self.steps if s.via is not None and (cause is None or s.event["cause"] == cause)
                and (type is None or s.event["type"] == type)]

    def after(self, step: Step) -> int:
        """The index of `step` among all steps."""
        return next(i for i, s in enumerate(self.steps) if s is step)

    def index(self, event_id: str, nth: int = 0) -> int:
        return [i for i, s in enumerate(self.steps) if s.result["id"] == event_id][nth]

    def inputs(self) -> list[dict[str, Any]]:
        """The results of the input events, in input order."""
        return [s.result for s in self.steps if s.via is None]

    def context_after(self, event_id: str) -> dict[str, Any]:
        """The user's context right after the (first) decision of an input event."""
        ctx = self.steps[self.index(event_id)].context
        assert ctx is not None
        return ctx

    def context(self, user: str) -> dict[str, Any]:
        """The user's context at the end."""
        return self.engine.context(CAMPAIGN, user)


@pytest.fixture(scope="module")
def run() -> Run:
    return Run(load_events())


def chance(n: int, pool: str, reason: str) -> tuple[str, dict[str, Any]]:
    return ("lottery.grant_chance", {"chances": n, "pool": pool, "reason": reason})


def points(n: int, reason: str) -> tuple[str, dict[str, Any]]:
    return ("wallet.grant_points", {"points": n, "reason": reason})


def cash(cents: int, tier: int, task: str) -> tuple[str, dict[str, Any]]:
    return ("wallet.grant_cash", {"amount_cents": cents, "reason": f"task_tier_{tier}", "task": task})


def one_batch(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results of `events` decided in one batch of a fresh engine: no made event decided, no timer fired."""
    return ShardEngine(load_config(CONFIG / "example.yaml")).process(events, NOW_MS).results


def ev(eid: str, user: str, type: str, ts: int, **data: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"id": eid, "campaign": CAMPAIGN, "user": user, "type": type, "ts": ts}
    if data:
        e["data"] = data
    return e


# -- the whole file ------------------------------------------------------------------------------------
def test_every_event_and_every_made_event_has_one_step_and_no_rule_fails(run: Run) -> None:
    events = load_events()
    inputs = [s for s in run.steps if s.via is None]
    assert [s.result["id"] for s in inputs] == [e["id"] for e in events] and len(events) == 42
    assert Counter(s.result["status"] for s in inputs) == {"applied": 39, "duplicate": 2, "rejected": 1}
    made = Counter((s.via, s.event["type"]) for s in run.made())
    assert made == {("send", "assist.credited"): 5, ("send", "team.reward"): 6, ("timer", "checkin.missed"): 2,
                    ("timer", "task.expired"): 1}
    assert len(run.steps) == 42 + 14
    assert all(s.result["status"] == "applied" and s.event["depth"] == 1 for s in run.made())
    assert [j for j in run.journal if j["error"] is not None] == []
    assert [s.result["errors"] for s in run.steps if s.result["errors"]] == [
        ["user: expected a string of 1..256 characters, got nothing"]]
    assert run.local.pending() == 0  # every timer fired, was replaced or cancelled


def test_every_action_id_is_unique_and_names_its_cause_and_rule(run: Run) -> None:
    applied = [s.result for s in run.steps if s.result["status"] == "applied"]
    actions = [a for r in applied for a in r["actions"]]
    assert Counter(a["type"] for a in actions) == {"wallet.grant_points": 11, "wallet.grant_cash": 7,
                                                   "lottery.grant_chance": 6}
    assert len({a["id"] for a in actions}) == len(actions)
    for r in applied:
        for a in r["actions"]:
            assert a["cause"] == r["id"] and a["campaign"] == CAMPAIGN and a["script_version"] == 1


def test_the_dry_run_prints_these_steps() -> None:
    out = io.StringIO()
    assert dry_run(str(CONFIG / "example.yaml"), str(CONFIG / "example-events.jsonl"), None, NOW_MS, out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [json.loads(json.dumps(s.line(), default=str)) for s in Run(load_events()).steps]
    assert [ln["made"]["via"] for ln in lines if "made" in ln].count("timer") == 3


def test_rules_decide_the_input_events_alike_whenever_the_timers_fire(run: Run) -> None:
    """In a cluster a timer fires once its time has passed on the wall clock, maybe after events of a later time:
    the input events in one batch, with no timer fired at all, are decided as the dry run decides them."""
    assert one_batch(load_events()) == run.inputs()


# -- (a) quiz ------------------------------------------------------------------------------------------
def test_first_quiz_answer_grants_one_lottery_chance(run: Run) -> None:
    assert run.granted("evt-quiz-0001") == [chance(1, "standard", "first_quiz")]
    assert run.result("evt-quiz-0001")["actions"][0]["rule"] == "first_quiz_lottery"
    assert run.granted("evt-quiz-0002") == []  # second answer: nothing
    assert run.context("u-alice") == {"quiz.answered": 2}


def test_a_retried_event_id_is_a_duplicate_that_repeats_its_actions_and_has_no_effect(run: Run) -> None:
    dup = run.result("evt-quiz-0001", nth=1)
    assert (dup["id"], dup["status"]) == ("evt-quiz-0001", "duplicate")
    assert dup["actions"] == run.result("evt-quiz-0001")["actions"] != []
    assert list(dup["errors"]) == []
    assert len([j for j in run.journal if j["event"] == "evt-quiz-0001"]) == 1  # decided once


def test_event_before_the_campaign_window_is_applied_without_running_rules(run: Run) -> None:
    assert run.granted("evt-quiz-0003") == []
    assert [j for j in run.journal if j["event"] == "evt-quiz-0003"] == []
    assert run.granted("evt-quiz-0004") == [chance(1, "standard", "first_quiz")]  # still bob's first
    assert run.context("u-bob") == {"quiz.answered": 1}


def test_invalid_event_is_rejected_with_the_reason(run: Run) -> None:
    r = run.result("evt-quiz-0005")
    assert r["status"] == "rejected" and list(r["actions"]) == []
    assert list(r["errors"]) == ["user: expected a string of 1..256 characters, got nothing"]


# -- (b) tasks -----------------------------------------------------------------------------------------
def test_a_task_completed_within_24_hours_pays_by_tier_and_cancels_its_timer(run: Run) -> None:
    for n in (1, 2, 3):
        assert run.granted(f"evt-task-{2 * n - 1:04d}") == []  # accepting pays nothing
        assert run.granted(f"evt-task-{2 * n:04d}") == [cash(100, 1, f"share_poster_{n}")]
    assert run.granted("evt-task-0010") == [cash(300, 2, "invite_2_friends")]
    assert run.granted("evt-task-0012") == [cash(1000, 3, "spend_100_cny"), chance(1, "gold", "task_tier_3")]
    effects = [e for j in run.journal if j["event"] == "evt-task-0012" for e in j["effects"]]
    assert effects == [{"cancel": "task.spend_100_cny", "id": effects[0]["id"]}] and effects[0]["id"]
    assert run.made(cause="evt-task-0011") == []  # the timer was cancelled: it never fired
    assert run.context("u-ivan") == {"task.completed": 4, "task.max_tier": 1}  # nothing left open


def test_a_task_completed_after_its_deadline_pays_nothing(run: Run) -> None:
    (expiry,) = run.made(type="task.expired")
    assert expiry.via == "timer" and expiry.user == "u-judy"
    assert expiry.event == {"user": "u-judy", "type": "task.expired", "ts": at("01-31 16:00") + DAY,
                            "cause": "evt-task-0013", "depth": 1}
    assert expiry.context == {"task.completed": 2, "task.max_tier": 3, "task.expired": ["watch_video_1"]}
    assert run.after(expiry) == run.index("evt-task-0018") - 1  # fired first, by the late completion's clock
    assert run.granted("evt-task-0018") == []
    assert [list(j["actions"]) for j in run.journal if j["event"] == "evt-task-0018"] == [[]]
    assert run.context("u-judy") == {"task.completed": 2, "task.max_tier": 3, "task.expired": ["watch_video_1"]}


def test_fourth_cash_grant_of_a_day_is_refused_by_the_cap(run: Run) -> None:
    assert run.granted("evt-task-0008") == []
    assert run.refused("evt-task-0008") == [
        ("wallet.grant_cash", "cap:wallet.grant_cash/day/3: at most 3 wallet.grant_cash per user per day"),
    ]


def test_cash_budget_refuses_what_it_cannot_cover_and_is_never_overspent(run: Run) -> None:
    # Spent before ken: carol 700 + ivan 3 x 100 + judy 300 + 1000 = 2300 of 3000; 700 left.
    assert run.granted("evt-task-0015") == [chance(1, "gold", "task_tier_3")]
    assert run.refused("evt-task-0015") == [("wallet.grant_cash", "budget:cash: cannot cover amount_cents=1000")]
    assert run.granted("evt-task-0017") == [cash(100, 1, "share_poster_1")]  # a smaller grant still fits
    spent = [a["params"]["amount_cents"] for s in run.steps if s.result["status"] == "applied"
             for a in s.result["actions"] if a["type"] == "wallet.grant_cash"]
    assert sum(spent) == 2400
    assert isinstance(run.engine.budgets, LocalBudgets)
    assert run.engine.budgets.remaining[(CAMPAIGN, "cash")] == 600


def test_task_deadline_to_the_millisecond_and_tasks_never_accepted_or_done_twice() -> None:
    t0 = at("02-05 10:00")
    events = [
        ev("a1", "u-t", "task.accepted", t0, task="in_time", tier=2),
        ev("a2", "u-t", "task.accepted", t0, task="late", tier=2),
        ev("a3", "u-t", "task.accepted", t0 + HOUR, task="late", tier=2),  # already open: deadline unchanged
        ev("x1", "u-t", "task.expired", t0 + 2 * HOUR, task="in_time"),  # not from its timer, not due: ignored
        ev("c1", "u-t", "task.completed", t0 + DAY - 1, task="in_time", tier=2),  # 1 ms before the deadline
        ev("c2", "u-t", "task.completed", t0 + DAY, task="late", tier=2),  # at the deadline: expired first
        ev("c3", "u-t", "task.completed", t0 + DAY + 1, task="in_time", tier=2),  # done already
        ev("c4", "u-t", "task.completed", t0 + DAY + 2, task="never_accepted", tier=3),
        ev("a4", "u-t", "task.accepted", t0 + 2 * DAY, task="late", tier=2),  # a new try, a new 24 hours
        ev("c5", "u-t", "task.completed", t0 + 3 * DAY - 1, task="late", tier=2),
    ]
    r = Run(events)
    assert r.granted("c1") == [cash(300, 2, "in_time")]
    assert [(s.event["type"], s.event["ts"], s.event["cause"]) for s in r.made()] == [
        ("task.expired", t0 + DAY, "a2")]
    assert r.index("c2") == r.after(r.made()[0]) + 1
    assert r.granted("c2") == r.granted("c3") == r.granted("c4") == []
    assert r.granted("c5") == [cash(300, 2, "late")]
    assert r.context("u-t") == {"task.completed": 2, "task.max_tier": 2, "task.expired": ["late"]}
    assert r.local.pending() == 0
    # With no timer fired (a cluster's firer running late), the same events pay the same.
    assert one_batch(events) == r.inputs()


# -- (c) check-in --------------------------------------------------------------------------------------
def test_checkin_streak_pays_daily_points_and_a_bonus_on_the_seventh_consecutive_day(run: Run) -> None:
    daily = [points(10, "checkin")]
    for n in (1, 2, 3, 5, 6, 7):  # days 1..6; 0002 is 00:30 local, still a new day in Asia/Shanghai
        assert run.granted(f"evt-checkin-{n:04d}") == daily, n
    assert run.granted("evt-checkin-0004") == []  # a second check-in on day 3
    assert run.context_after("evt-checkin-0004") == run.context_after("evt-checkin-0003")
    assert run.granted("evt-checkin-0008") == daily + [
        ("wallet.grant_cash", {"amount_cents": 700, "reason": "checkin_streak_7"})]
    streaks = [run.context_after(f"evt-checkin-{n:04d}")["checkin.streak"] for n in range(1, 9)]
    assert streaks == [1, 2, 3, 3, 4, 5, 6, 7]
    # Checked in every day: each check-in replaced the timer before it was due, none fired in those 7 days.
    assert [s for s in run.made(type="checkin.missed") if s.event["ts"] <= at("01-28 00:00")] == []


def test_a_missed_day_resets_the_streak_by_the_timer(run: Run) -> None:
    first, second = run.made(type="checkin.missed")
    # 01-27 was day 7, 01-28 was missed: the timer set on 01-27 fires at the end of 01-28.
    assert first.via == "timer" and first.event == {"user": "u-carol", "type": "checkin.missed",
                                                    "ts": at("01-29 00:00"), "cause": "evt-checkin-0008", "depth": 1}
    assert first.context == {"checkin.last_day": "2026-01-27", "checkin.streak": 0, "checkin.total": 7}
    assert run.after(first) == run.index("evt-checkin-0009") - 1  # fired before the check-in of 01-29
    assert run.granted("evt-checkin-0009") == [points(10, "checkin")]  # day 1 again, no bonus
    assert run.context_after("evt-checkin-0009")["checkin.streak"] == 1
    # Nobody checked in on 01-30: the timer set on 01-29 fires at the end of 01-30 (by judy's clock, 01-31).
    assert second.event == {"user": "u-carol", "type": "checkin.missed", "ts": at("01-31 00:00"),
                            "cause": "evt-checkin-0009", "depth": 1}
    assert run.context("u-carol") == {"checkin.last_day": "2026-01-29", "checkin.streak": 0, "checkin.total": 8}


def test_checkin_streak_expires_exactly_at_the_end_of_the_next_day() -> None:
    days = [at(f"02-0{d} 12:00") for d in range(1, 6)]  # 5 days in a row
    kept = at("02-06 23:59:59.999")  # the last millisecond of the next day: the streak goes on
    broken = at("02-08 00:00")  # 02-07 missed: the timer is due at this very millisecond and fires first
    again = [at(f"02-{d:02d} 09:00") for d in range(9, 15)]  # then 6 more days in a row
    times = [*days, kept, broken, *again]
    events = [ev(f"k{i}", "u-k", "checkin.checked_in", t) for i, t in enumerate(times, 1)]
    events.insert(3, ev("f1", "u-k", "checkin.missed", days[2] + 1))  # not from its timer, not due: ignored
    r = Run(events, until_ms=again[-1])
    streaks = [r.context_after(f"k{i}")["checkin.streak"] for i in range(1, 14)]
    assert streaks == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 7]
    (missed,) = r.made()
    assert missed.event["ts"] == broken and missed.event["cause"] == "k6" and r.index("k7") == r.after(missed) + 1
    assert missed.context is not None and missed.context["checkin.streak"] == 0
    bonus = ("wallet.grant_cash", {"amount_cents": 700, "reason": "checkin_streak_7"})
    assert [i for i in range(1, 14) if bonus in r.granted(f"k{i}")] == [13]  # not k7: the streak was broken
    assert r.context("u-k") == {"checkin.last_day": "2026-02-14", "checkin.streak": 7, "checkin.total": 13,
                                "checkin.expires": at("02-16 00:00")}
    assert r.local.pending() == 1  # the timer of 02-14, due after --until
    # With no timer fired (a cluster's firer running late), the same check-ins pay the same.
    assert one_batch(events) == r.inputs()


# -- (d) assist ----------------------------------------------------------------------------------------
def test_each_help_is_credited_to_the_inviter_by_a_send(run: Run) -> None:
    for eid, helper in [("evt-assist-0001", "u-leo"), ("evt-assist-0002", "u-mia"), ("evt-assist-0003", "u-mia"),
                        ("evt-assist-0005", "u-nick"), ("evt-assist-0006", "u-olga")]:
        assert run.granted(eid) == []  # the helper gets nothing
        assert run.steps[run.index(eid)].user == helper
        (credit,) = run.made(cause=eid)
        assert credit.via == "send" and credit.event["user"] == "u-erin" and credit.event["type"] == "assist.credited"
        assert credit.event["ts"] == next(e["ts"] for e in load_events() if e["id"] == eid)
        assert run.after(credit) == run.index(eid) + 1  # decided right after the help
        data = [j for j in run.journal if j["event"] == credit.result["id"]]
        assert [j["rule"] for j in data] == ["assist_inviter_reward"]
        assert [e for j in run.journal if j["event"] == eid for e in j["effects"]] == [
            {"send": "u-erin", "type": "assist.credited", "id": credit.result["id"]}]
    assert run.result("evt-assist-0003", nth=1)["status"] == "duplicate"  # a retried id: credited once
    assert run.made(cause="evt-assist-0004") == []  # erin helping herself: nothing sent
    assert run.context("u-mia") == {"assist.helps": 2}


def test_inviter_is_rewarded_on_the_third_distinct_helper_once(run: Run) -> None:
    rewards = [(s.event["cause"], s.result["actions"]) for s in run.made(type="assist.credited")
               if s.result["actions"]]
    assert len(rewards) == 1 and rewards[0][0] == "evt-assist-0005"  # leo, mia, mia again, nick: the third
    (action,) = rewards[0][1]
    assert (action["type"], action["params"]) == chance(3, "standard", "assist_3")
    assert (action["user"], action["rule"]) == ("u-erin", "assist_inviter_reward")
    assert run.context("u-erin") == {"assist.helpers": ["u-leo", "u-mia", "u-nick"], "assist.rewarded": True}


# -- (e) team ------------------------------------------------------------------------------------------
TEAM = [("u-frank", "leader"), ("u-grace", "member"), ("u-heidi", "member")]


def test_team_completed_fans_out_to_every_member_with_its_role(run: Run) -> None:
    for eid in ("evt-team-0001", "evt-team-0002"):
        assert run.granted(eid) == []
        sent = run.made(cause=eid)
        assert [(s.via, s.event["user"], s.event["type"]) for s in sent] == [
            ("send", u, "team.reward") for u, _ in TEAM]
        assert [run.after(s) for s in sent] == [run.index(eid) + k for k in (1, 2, 3)]


def test_team_members_are_paid_by_role_exactly_once(run: Run) -> None:
    first = {s.event["user"]: [(a["type"], a["params"]) for a in s.result["actions"]]
             for s in run.made(cause="evt-team-0001")}
    assert first == {
        "u-frank": [points(1000, "team_leader"), chance(1, "gold", "team_leader")],
        "u-grace": [points(300, "team_member")],
        "u-heidi": [points(300, "team_member")],
    }
    assert [s.result["actions"] for s in run.made(cause="evt-team-0002")] == [[], [], []]  # resent: paid already
    for user, role in TEAM:
        assert run.context(user) == {"team.id": "t-7", "team.role": role, "team.rewarded": ["t-7"]}


def test_a_team_list_not_sent_by_its_leader_or_with_a_user_twice_sends_nothing() -> None:
    t0 = at("02-06 10:00")
    team = [{"user": "u-l", "role": "leader"}, {"user": "u-m", "role": "member"}]
    r = Run([
        ev("x1", "u-m", "team.completed", t0, team="t-1", members=team),  # sent by a member
        ev("x2", "u-l", "team.completed", t0, team="t-1", members=[*team, {"user": "u-m", "role": "leader"}]),
        ev("x3", "u-l", "team.completed", t0, team="t-1", members=[{"user": "u-l", "role": "boss"}]),
        ev("x4", "u-l", "team.completed", t0, team="t-1", members=team),
        ev("x5", "u-l", "team.completed", t0 + 1, team="t-2", members=team),  # a second team: paid again
        ev("x6", "u-l", "team.completed", t0 + 2, team="t-3", members=[{**m, "role": "member"} for m in team]),
        ev("x7", "u-l", "team.completed", t0 + 3, team="t-3", members=[*team, team[1]]),
    ])
    assert [s.event["cause"] for s in r.made()] == ["x4", "x4", "x5", "x5"]
    assert [[(a["user"], a["params"]["reason"]) for a in s.result["actions"]] for s in r.made()] == [
        [("u-l", "team_leader"), ("u-l", "team_leader")], [("u-m", "team_member")],
        [("u-l", "team_leader"), ("u-l", "team_leader")], [("u-m", "team_member")]]
    assert r.context("u-m") == {"team.id": "t-2", "team.role": "member", "team.rewarded": ["t-1", "t-2"]}
