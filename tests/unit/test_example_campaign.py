"""The example campaign: config/example-events.jsonl through ShardEngine gives what each rule promises."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.engine import LocalBudgets, ShardEngine
from playbus.actors.engine.decisions import repeat_actions
from playbus.actors.engine.keys import user_key
from playbus.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "config"
NOW_MS = 1_769_900_000_000  # receive time of the batch; every example event carries its own ts
CAMPAIGN = "spring2026"


def load_events() -> list[dict[str, Any]]:
    with open(CONFIG / "example-events.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Run:
    """The example events through one engine, in one batch or one event per batch."""

    def __init__(self, batch: bool) -> None:
        self.engine = ShardEngine(load_config(CONFIG / "example.yaml"))
        self.events = load_events()
        if batch:
            out = self.engine.process(self.events, now_ms=NOW_MS)
            self.results, self.journal = out.results, out.journal
        else:
            self.results, self.journal = [], []
            for ev in self.events:
                out = self.engine.process([ev], now_ms=NOW_MS)
                journals = {k: [j for j in self.journal if user_key(j["campaign"], j["user"]) == k]
                            for _, k, _ in out.earlier}
                repeat_actions(out.results, out.earlier, journals)  # duplicates of earlier batches, as a shard
                self.results += out.results
                self.journal += out.journal

    def result(self, event_id: str, nth: int = 0) -> dict[str, Any]:
        return [r for r in self.results if r["id"] == event_id][nth]

    def granted(self, event_id: str, nth: int = 0) -> list[tuple[str, dict[str, Any]]]:
        r = self.result(event_id, nth)
        assert r["status"] == "applied", r
        assert list(r["errors"]) == [], r
        return [(a["type"], a["params"]) for a in r["actions"]]

    def refused(self, event_id: str) -> list[tuple[str, str]]:
        entries = [j for j in self.journal if j["event"] == event_id]
        return [(x["type"], x["reason"]) for j in entries for x in j["refused"]]

    def context(self, user: str) -> dict[str, Any]:
        return self.engine.context(CAMPAIGN, user)


@pytest.fixture(scope="module", params=[True, False], ids=["one-batch", "event-per-batch"])
def run(request: pytest.FixtureRequest) -> Run:
    return Run(batch=request.param)


def chance(n: int, pool: str, reason: str) -> tuple[str, dict[str, Any]]:
    return ("lottery.grant_chance", {"chances": n, "pool": pool, "reason": reason})


def points(n: int, reason: str) -> tuple[str, dict[str, Any]]:
    return ("wallet.grant_points", {"points": n, "reason": reason})


def test_every_event_has_one_result_and_no_rule_fails(run: Run) -> None:
    assert len(run.results) == len(run.events) == 35
    assert [j for j in run.journal if j["error"] is not None] == []
    statuses = [r["status"] for r in run.results]
    assert statuses.count("duplicate") == 1 and statuses.count("rejected") == 1
    assert statuses.count("applied") == 33


def test_every_action_id_is_unique_and_names_its_cause_and_rule(run: Run) -> None:
    actions = [a for r in run.results if r["status"] == "applied" for a in r["actions"]]
    assert len(actions) == 24
    assert len({a["id"] for a in actions}) == len(actions)
    for r in run.results:
        for a in r["actions"]:
            assert a["cause"] == r["id"] and a["campaign"] == CAMPAIGN and a["script_version"] == 1


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
    # So bob's first answer inside the window is still his first.
    assert run.granted("evt-quiz-0004") == [chance(1, "standard", "first_quiz")]
    assert run.context("u-bob") == {"quiz.answered": 1}


def test_invalid_event_is_rejected_with_the_reason(run: Run) -> None:
    r = run.result("evt-quiz-0005")
    assert r["status"] == "rejected"
    assert list(r["actions"]) == []
    assert list(r["errors"]) == ["user: expected a string of 1..256 characters, got nothing"]


def test_checkin_pays_daily_points_and_a_bonus_on_the_seventh_consecutive_day(run: Run) -> None:
    daily = [points(10, "checkin")]
    for n in (1, 2, 3, 5, 6, 7):  # days 1..6; 0002 is 00:30 local, still a new day in Asia/Shanghai
        assert run.granted(f"evt-checkin-{n:04d}") == daily, n
    assert run.granted("evt-checkin-0004") == []  # a second check-in on day 3
    assert run.granted("evt-checkin-0008") == daily + [
        ("wallet.grant_cash", {"amount_cents": 700, "reason": "checkin_streak_7"}),
    ]
    # 01-28 was missed: the streak restarts, no bonus.
    assert run.granted("evt-checkin-0009") == daily
    assert run.context("u-carol") == {
        "checkin.last_day": "2026-01-29", "checkin.streak": 1, "checkin.total": 8,
    }


def test_task_pays_cash_by_tier_and_tier_three_unlocks_the_gold_pool(run: Run) -> None:
    def cash(cents: int, tier: int, task: str) -> tuple[str, dict[str, Any]]:
        return ("wallet.grant_cash", {"amount_cents": cents, "reason": f"task_tier_{tier}", "task": task})

    for n in (1, 2, 3):
        assert run.granted(f"evt-task-{n:04d}") == [cash(100, 1, f"share_poster_{n}")]
    assert run.granted("evt-task-0005") == [cash(300, 2, "invite_2_friends")]
    assert run.granted("evt-task-0006") == [cash(1000, 3, "spend_100_cny"), chance(1, "gold", "task_tier_3")]
    assert run.context("u-judy") == {"task.completed": 2, "task.max_tier": 3}


def test_fourth_cash_grant_of_a_day_is_refused_by_the_cap(run: Run) -> None:
    assert run.granted("evt-task-0004") == []
    assert run.refused("evt-task-0004") == [
        ("wallet.grant_cash", "cap:wallet.grant_cash/day/3: at most 3 wallet.grant_cash per user per day"),
    ]
    assert run.context("u-ivan") == {"task.completed": 4, "task.max_tier": 1}


def test_cash_budget_refuses_what_it_cannot_cover_and_is_never_overspent(run: Run) -> None:
    # Spent before ken: carol 700 + ivan 3 x 100 + judy 300 + 1000 = 2300 of 3000; 700 left.
    assert run.granted("evt-task-0007") == [chance(1, "gold", "task_tier_3")]
    assert run.refused("evt-task-0007") == [
        ("wallet.grant_cash", "budget:cash: cannot cover amount_cents=1000"),
    ]
    # A smaller grant still fits.
    assert run.granted("evt-task-0008") == [
        ("wallet.grant_cash", {"amount_cents": 100, "reason": "task_tier_1", "task": "share_poster_1"}),
    ]
    actions = [a for r in run.results for a in r["actions"]]
    cash = [a["params"]["amount_cents"] for a in actions if a["type"] == "wallet.grant_cash"]
    assert sum(cash) == 2400
    assert isinstance(run.engine.budgets, LocalBudgets)
    assert run.engine.budgets.remaining[(CAMPAIGN, "cash")] == 600


def test_inviter_is_rewarded_on_the_third_distinct_helper_once(run: Run) -> None:
    assert run.granted("evt-assist-0001") == []
    assert run.granted("evt-assist-0002") == []
    assert run.granted("evt-assist-0003") == []  # u-mia again: counted once
    assert run.granted("evt-assist-0004") == [chance(3, "standard", "assist_3")]
    assert run.result("evt-assist-0004")["actions"][0]["user"] == "u-erin"
    assert run.granted("evt-assist-0005") == []  # a fourth helper: already rewarded
    assert run.context("u-erin") == {"assist.helpers": ["u-leo", "u-mia", "u-nick"], "assist.rewarded": True}


def test_team_members_are_rewarded_by_role_once(run: Run) -> None:
    for n in (1, 2, 3):
        assert run.granted(f"evt-team-{n:04d}") == []  # forming a team only records the role
    assert run.granted("evt-team-0004") == [points(1000, "team_leader"), chance(1, "gold", "team_leader")]
    assert run.granted("evt-team-0005") == [points(300, "team_member")]
    assert run.granted("evt-team-0006") == [points(300, "team_member")]
    assert run.granted("evt-team-0007") == []  # grace's completion resent with a new id: no second reward
    assert run.context("u-frank") == {"team.id": "t-7", "team.role": "leader", "team.rewarded": "t-7"}
    assert run.context("u-heidi") == {"team.id": "t-7", "team.role": "member", "team.rewarded": "t-7"}
