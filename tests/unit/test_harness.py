"""The load tools' behaviours (loadtest/harness.py): deterministic for a seed, unique ids, valid for the
example campaign (run through LocalRun, the dry run's engine with the events the rules make: nothing rejected,
no rule error, every rule run), weights respected; plus the user mix, how a reply of POST /v1/events is judged,
percentiles and the latency recorder. No Ray, no Redis, no network."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.engine import ShardEngine
from playbus.actors.engine.local import LocalRun, Step
from playbus.config import load_config
from playbus.loadtest.harness import (
    BEHAVIOURS,
    DAY,
    SPRING2026,
    Behaviour,
    CampaignWindow,
    CheckinUser,
    Inviter,
    LatencyRecorder,
    QuizPlayer,
    TaskDoer,
    TeamMember,
    make_users,
    reply_problem,
    task,
)
from playbus.loadtest.stats import percentile

CONFIG = Path(__file__).resolve().parents[2] / "config" / "example.yaml"
NOW_MS = 1_769_900_000_000


def generate(users: list[Behaviour], rounds: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(rounds):
        for u in users:
            out += u.next_events()
    return out


class Decided:
    """Events through LocalRun on the example campaign, in time order (as a campaign lives them: the timers fire
    by that clock), with the journal of every rule run."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.engine = ShardEngine(load_config(CONFIG))
        run = LocalRun(self.engine, NOW_MS)
        self.journal = run.journal
        self.steps: list[Step] = []
        for e in sorted(events, key=lambda e: e["ts"]):  # stable: a user's events keep their order
            self.steps += run.event(e)
        self.steps += run.finish()
        self.actions = [a for s in self.steps for a in s.result["actions"] if s.result["status"] == "applied"]


def test_the_default_campaign_window_is_the_example_configs() -> None:
    assert CampaignWindow.from_config(CONFIG) == SPRING2026


def test_same_seed_same_events_other_seed_other_events() -> None:
    behaviours = list(BEHAVIOURS.values())
    a = generate(make_users(behaviours, 20, seed=7), 15)
    b = generate(make_users(behaviours, 20, seed=7), 15)
    c = generate(make_users(behaviours, 20, seed=8), 15)
    assert a == b
    assert [e["id"] for e in a] != [e["id"] for e in c]
    assert {e["id"] for e in a}.isdisjoint(e["id"] for e in c)  # the seed is in the id prefix


def test_ids_are_unique_and_timestamps_move_forward_inside_the_window() -> None:
    users = make_users(list(BEHAVIOURS.values()), 30, seed=3)
    events = generate(users, 120)  # enough for check-in users to run past the campaign end and come back
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids))
    assert all(0 < len(i) <= 128 for i in ids)
    assert all(SPRING2026.starts_ms <= e["ts"] < SPRING2026.ends_ms for e in events)
    assert all(e["campaign"] == "spring2026" for e in events)
    by_user: dict[str, list[int]] = {}
    for e in events:
        by_user.setdefault(e["user"], []).append(e["ts"])
    assert all(ts == sorted(ts) for ts in by_user.values()), "a user's clock went back"
    assert any(u.generation > 0 for u in users if isinstance(u, CheckinUser))


@pytest.mark.parametrize("seed", [1, 2])
def test_generated_events_are_valid_for_the_example_campaign(seed: int) -> None:
    users = make_users(list(BEHAVIOURS.values()), 40, seed=seed)
    events = generate(users, 10)  # about 450 events of every gameplay
    assert {e["type"] for e in events} == {"quiz.answered", "task.accepted", "task.completed", "checkin.checked_in",
                                           "assist.helped", "team.completed"}
    # In one batch (as one request would be): every event applied, no rule error.
    out = ShardEngine(load_config(CONFIG)).process(events, NOW_MS)
    assert Counter(r["status"] for r in out.results) == {"applied": len(events)}
    assert [r["errors"] for r in out.results if r["errors"]] == [] and out.failed == []
    # With the events the rules make: the same, and every rule of the example campaign runs.
    d = Decided(events)
    statuses = Counter(s.result["status"] for s in d.steps)
    assert statuses == {"applied": len(d.steps)}, [s.result for s in d.steps if s.result["status"] != "applied"][:3]
    assert [s.result["errors"] for s in d.steps if s.result["errors"]] == []
    assert [j for j in d.journal if j["error"] is not None] == []
    made = Counter(s.event["type"] for s in d.steps if s.via is not None)
    assert set(made) == {"assist.credited", "team.reward", "checkin.missed", "task.expired"}
    assert {j["rule"] for j in d.journal} == {r.id for c in load_config(CONFIG).campaigns for r in c.rules}
    assert {j["rule"] for j in d.journal if j["actions"]} == {
        "first_quiz_lottery", "task_cash_by_tier", "checkin_streak", "assist_inviter_reward", "team_role_reward"}


def test_event_shapes_match_the_example_events() -> None:
    quiz = QuizPlayer(0, seed=1).next_events()[0]
    assert quiz["type"] == "quiz.answered" and set(quiz["data"]) == {"question", "correct"}
    accepted, completed = TaskDoer(0, seed=1).next_events()
    assert accepted["type"] == "task.accepted" and completed["type"] == "task.completed"
    assert accepted["data"] == completed["data"] and accepted["ts"] < completed["ts"]
    assert accepted["data"]["tier"] in (1, 2, 3) and isinstance(accepted["data"]["task"], str)
    tasks = generate([TaskDoer(0, seed=1)], 60)
    pairs = list(zip(tasks[::2], tasks[1::2], strict=True))
    assert all(a["type"] == "task.accepted" and c["type"] == "task.completed" and a["data"] == c["data"]
               for a, c in pairs)
    took = [c["ts"] - a["ts"] for a, c in pairs]
    assert any(t > DAY for t in took) and sum(t < DAY for t in took) > 0.8 * len(took)  # some too late
    c = CheckinUser(0, seed=1).next_events()[0]
    assert c["type"] == "checkin.checked_in" and "data" not in c
    inviter = Inviter(0, seed=1)
    helps = generate([inviter], 30)
    assert all(e["type"] == "assist.helped" and e["data"]["inviter"] == inviter.user for e in helps)
    assert all(e["user"].startswith(inviter.user + "-h") and e["data"]["chain"].startswith("chain-") for e in helps)
    assert len({e["user"] for e in helps}) < len(helps)  # some friends help twice
    leader = TeamMember(0, seed=1)
    team = generate([leader], 40)
    assert all(e["type"] == "team.completed" and e["user"] == leader.user for e in team)
    for e in team:
        members = e["data"]["members"]
        assert members[0] == {"user": leader.user, "role": "leader"} and 2 <= len(members) <= 1 + TeamMember.MEMBERS
        assert all(m["role"] == "member" and m["user"].startswith(e["data"]["team"] + "-m") for m in members[1:])
    teams = Counter(e["data"]["team"] for e in team)
    assert len(teams) < len(team) and max(teams.values()) >= 2  # some completions are resent


def test_the_example_rules_reward_what_the_behaviours_do() -> None:
    """One user of each kind, run long enough: the quiz chance, tier cash, a 7-day streak, the assist reward
    and the team rewards each happen; late tasks and missed days pay nothing (the budget of 30.00 CNY runs dry,
    which is no rule error)."""
    users: list[Behaviour] = [QuizPlayer(0, 5), TaskDoer(0, 5), CheckinUser(0, 5), Inviter(0, 5), TeamMember(0, 5)]
    events = generate(users, 25)
    d = Decided(events)
    reasons = Counter(a["params"].get("reason") for a in d.actions)
    assert reasons["first_quiz"] == 1 and reasons["checkin"] >= 7 and reasons["checkin_streak_7"] >= 1
    assert sum(n for r, n in reasons.items() if r and r.startswith("task_tier_")) >= 1
    assert reasons["assist_3"] == 1
    assert [a["user"] for a in d.actions if a["params"].get("reason") == "assist_3"] == [users[3].user]
    # Every team completed pays its leader (points and a gold chance) and each member, once, whatever the resends.
    teams = {e["data"]["team"]: e["data"]["members"] for e in events if e["type"] == "team.completed"}
    paid = Counter((a["user"], a["params"]["reason"]) for a in d.actions if a["type"] == "wallet.grant_points"
                   and a["params"]["reason"].startswith("team_"))
    assert paid == Counter((m["user"], f"team_{m['role']}") for ms in teams.values() for m in ms)
    # A task completed after its 24 hours pays nothing: it expired first.
    late = {a["data"]["task"] for a, c in zip(events, events[1:], strict=False)
            if a["type"] == "task.accepted" and c["type"] == "task.completed" and c["ts"] - a["ts"] >= DAY}
    expired = {s.event["cause"] for s in d.steps if s.via == "timer" and s.event["type"] == "task.expired"}
    assert late and len(expired) >= len(late)
    assert not late & {a["params"].get("task") for a in d.actions}


def test_user_mix_follows_behaviour_weights() -> None:
    users = make_users(list(BEHAVIOURS.values()), 200, seed=0)
    mix = Counter(type(u).__name__ for u in users)
    total_w = sum(b.weight for b in BEHAVIOURS.values())
    assert sum(mix.values()) == 200
    for name, b in BEHAVIOURS.items():
        assert abs(mix[name] - 200 * b.weight / total_w) <= 1
    assert len({u.user for u in users}) == 200
    assert [type(u).__name__ for u in users[:5]] == list(BEHAVIOURS)  # interleaved, not grouped


def test_task_weights_are_respected_roughly() -> None:
    class Weighted(Behaviour):
        kind = "w"

        @task(1)
        def rare(self) -> dict[str, Any]:
            return self.event("w.rare")

        @task(9)
        def common(self) -> dict[str, Any]:
            return self.event("w.common")

        @task
        def bare(self) -> dict[str, Any]:
            return self.event("w.bare")

    assert Weighted.tasks() == (("rare", "common", "bare"), (1, 9, 1))
    u = Weighted(0, seed=11)
    counts = Counter(e["type"] for e in generate([u], 5500))
    assert 0.85 * 4500 <= counts["w.common"] <= 1.15 * 4500
    assert 0.8 * 500 <= counts["w.rare"] <= 1.2 * 500 and 0.8 * 500 <= counts["w.bare"] <= 1.2 * 500

    tiers = Counter(e["data"]["tier"] for e in generate([TaskDoer(i, seed=4) for i in range(10)], 300)
                    if e["type"] == "task.accepted")
    n = sum(tiers.values())
    assert abs(tiers[1] / n - 0.6) < 0.05 and abs(tiers[2] / n - 0.3) < 0.05 and abs(tiers[3] / n - 0.1) < 0.04


def test_a_behaviour_without_tasks_or_with_a_bad_weight_is_refused() -> None:
    class Empty(Behaviour):
        kind = "e"

    with pytest.raises(TypeError):
        Empty(0).next_events()
    with pytest.raises(ValueError):
        task(0)


def test_percentiles_and_latency_recorder() -> None:
    xs = sorted(float(i) for i in range(1, 101))
    assert percentile(xs, 0.5) == 50 and percentile(xs, 0.95) == 95 and percentile(xs, 0.99) == 99
    assert percentile([], 0.5) == 0.0 and percentile([7.0], 0.99) == 7.0
    rec = LatencyRecorder()
    for i in range(10):
        rec.add(float(i), "200" if i else "err")
    assert rec.summary()["p50"] == 4.0 and rec.outcomes == {"200": 9, "err": 1}
    assert len(rec.cut()) == 10 and rec.cut() == []


def test_every_gameplay_of_the_example_config_has_a_behaviour() -> None:
    gameplays = {r.on.split(".", 1)[0] for c in load_config(CONFIG).campaigns for r in c.rules}
    assert gameplays == {"quiz", "task", "checkin", "assist", "team"}
    assert {b.gameplay for b in BEHAVIOURS.values()} == gameplays
    for b in BEHAVIOURS.values():  # each behaviour's events are of its gameplay
        assert {e["type"].split(".", 1)[0] for e in generate([b(0, seed=2)], 20)} == {b.gameplay}


def test_reply_problem_names_what_is_wrong_without_ids() -> None:
    sent = [QuizPlayer(0, seed=9).next_events()[0], TaskDoer(0, seed=9).next_events()[0]]

    def result(e: dict[str, Any], status: str = "applied", errors: list[str] | None = None) -> dict[str, Any]:
        return {"id": e["id"], "status": status, "actions": [], "errors": errors or []}

    good = {"results": [result(sent[0]), result(sent[1], "duplicate")]}
    assert reply_problem(200, good, sent) is None
    assert reply_problem(503, good, sent) == "HTTP 503"
    assert reply_problem(200, None, sent) == "200 without a results list"
    assert reply_problem(200, {"results": {}}, sent) == "200 without a results list"
    assert reply_problem(200, {"results": good["results"][:1]}, sent) == "1 results for 2 events"
    assert reply_problem(200, {"results": good["results"][::-1]}, sent) == "results not in request order"
    rejected = {"results": [result(sent[0]), result(sent[1], "rejected", ["data: too large"])]}
    assert reply_problem(200, rejected, sent) == "rejected task.accepted: data: too large"
    rule_error = {"results": [result(sent[0], errors=["rule first_quiz_lottery: boom at line 3"]), result(sent[1])]}
    assert reply_problem(200, rule_error, sent) == "rule error on quiz.answered: rule first_quiz_lottery"
    assert reply_problem(200, {"results": [result(sent[0], "weird"), result(sent[1])]}, sent) == \
        "unknown status 'weird'"
    for bad in (rejected, rule_error):  # locust groups failures by message: no event id in it
        msg = reply_problem(200, bad, sent)
        assert msg is not None and not any(e["id"] in msg or e["user"] in msg for e in sent)
