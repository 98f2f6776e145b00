"""Canary activation: a version run by a stable share of the users (by a hash of campaign and user), recorded in
every decision's script_version, ended by activating a version at 100% (a rollback is the old version)."""

from __future__ import annotations

from pathlib import Path

from playbus.actors.engine.engine import ShardEngine, canary_bucket
from tests.support.configs import T0, ev, make_engine

V1 = 'function decide(e, ctx) ctx:incr("n", 1) emit("lottery.grant_chance", {chances = 1}) end'
V2 = 'function decide(e, ctx) ctx:incr("n", 1) emit("lottery.grant_chance", {chances = 2}) end'
RULES = [{"id": "quiz", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]}]
USERS = [f"u{i}" for i in range(4000)]


def engine(tmp_path: Path) -> ShardEngine:
    eng = make_engine(tmp_path, {"quiz": V1}, RULES)
    assert eng.put_script("quiz", V2) == 2
    return eng


def versions(eng: ShardEngine, tag: str) -> dict[str, int]:
    """user -> the version that decided (as recorded), checked against what the script did (v2 grants 2)."""
    out = eng.process([ev(f"{tag}-{u}", user=u) for u in USERS], T0)
    got = {}
    for res in out.results:
        [action] = res["actions"]
        assert action["params"]["chances"] == action["script_version"], action  # the Lua choice = the record
        got[action["user"]] = action["script_version"]
    return got


def test_a_canary_runs_for_its_share_of_users_stably_and_a_rollback_ends_it(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    eng.activate("quiz", 2, 25)
    first = versions(eng, "a")
    share = sum(v == 2 for v in first.values()) / len(USERS)
    assert 0.22 < share < 0.28, share  # 25% of 4,000 users: 3 standard deviations is about 2%
    assert first == {u: 2 if canary_bucket("c1", u) < 2500 else 1 for u in USERS}
    assert versions(eng, "b") == first  # stable per user
    eng.activate("quiz", 2, 60)  # widened: everyone in the 25% stays in
    wider = versions(eng, "c")
    assert all(wider[u] == 2 for u, v in first.items() if v == 2)
    assert 0.56 < sum(v == 2 for v in wider.values()) / len(USERS) < 0.64
    eng.activate("quiz", 1)  # the rollback
    assert set(versions(eng, "d").values()) == {1}
    eng.activate("quiz", 2, 100)  # the rollout
    assert set(versions(eng, "e").values()) == {2}


def test_a_canary_survives_a_new_engine_from_the_catalogs_listing(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    eng.activate("quiz", 2, 10)
    listing = [{"name": "quiz", "active": 1, "versions": {1: V1, 2: V2}, "canary": {"version": 2, "percent": 10}}]
    again = ShardEngine(eng.config, scripts=listing)
    assert versions(again, "x") == versions(eng, "x")


def test_buckets_spread_evenly() -> None:
    counts = [0] * 10
    for i in range(20_000):
        counts[canary_bucket("spring2026", f"user-{i}") // 1000] += 1
    assert all(1800 < c < 2200 for c in counts), counts
