"""A campaign's configuration evolves between two starts without losing or repeating a grant: caps keep their
counts by id, several budgets on one action are spent all or none, equal script names are refused."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.state import decode_snapshot
from playbus.config.errors import ConfigError
from playbus.config.loader import load_config
from tests.support.configs import T0, ev, make_config, make_engine, write_config

ALWAYS = """
function decide(event, ctx)
  ctx:incr("n", 1)
  emit("lottery.grant_chance", {chances = 1})
end
"""
R_ALWAYS = {"id": "always", "on": "quiz.answered", "script": "always", "emits": ["lottery.grant_chance"]}
DAILY_2 = {"action": "lottery.grant_chance", "per_user": 2, "period": "day"}
WEEKLY_5 = {"action": "lottery.grant_chance", "per_user": 5, "period": "week"}
KEY = "c1\x00u1"


def restart(old: ShardEngine, folder: Path, **kw: object) -> ShardEngine:
    """A new engine on an edited config, with the old engine's users restored from their snapshots."""
    new = make_engine(folder, {"always": ALWAYS}, [R_ALWAYS], **kw)
    for key, blob in old.snapshot(list(old.users)).items():
        new.restore(key, blob)
    return new


def granted(engine: ShardEngine, ids: list[int]) -> list[int]:
    return [len(r["actions"]) for r in engine.process([ev(i) for i in ids], T0).results]


def test_inserting_a_cap_before_another_keeps_the_other_s_count(tmp_path: Path) -> None:
    a = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS], caps=[DAILY_2])
    assert granted(a, [1, 2]) == [1, 1]
    b = restart(a, tmp_path, caps=[WEEKLY_5, DAILY_2])  # inserted first: positions shift, ids do not
    assert granted(b, [3]) == [0]  # the daily cap still counts 2 today


def test_a_cap_with_an_explicit_id_keeps_its_count_when_its_limit_changes(tmp_path: Path) -> None:
    a = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS], caps=[{**DAILY_2, "id": "daily"}])
    assert granted(a, [1, 2, 3]) == [1, 1, 0]
    b = restart(a, tmp_path, caps=[{**DAILY_2, "id": "daily", "per_user": 3}])
    assert granted(b, [4, 5]) == [1, 0]  # 2 counted + 1 more = the new limit of 3


def test_a_cap_without_an_id_whose_limit_changes_is_a_new_cap(tmp_path: Path) -> None:
    a = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS], caps=[DAILY_2])
    assert granted(a, [1, 2]) == [1, 1]
    b = restart(a, tmp_path, caps=[{**DAILY_2, "per_user": 3}])  # derived id changes: counts start again
    assert granted(b, [3, 4, 5, 6]) == [1, 1, 1, 0]


def test_two_caps_with_one_id_are_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"campaigns\[0\]\.caps\[1\]\.id: two caps with the id 'x'"):
        make_config(tmp_path, {"always": ALWAYS}, [R_ALWAYS], caps=[{**DAILY_2, "id": "x"}, {**WEEKLY_5, "id": "x"}])
    with pytest.raises(ConfigError, match=r"campaigns\[0\]\.caps\[1\]: two caps with the id"):
        make_config(tmp_path, {"always": ALWAYS}, [R_ALWAYS], caps=[DAILY_2, DAILY_2])


def test_a_version_1_snapshot_maps_cap_counts_by_position(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS], caps=[WEEKLY_5, DAILY_2])
    local_day = (T0 + 8 * 3_600_000) // 86_400_000  # Asia/Shanghai
    v1 = msgpack.packb([1, b"", [[1, local_day, 2]], msgpack.packb({"n": 2})], use_bin_type=True)
    eng.restore(KEY, v1)
    assert eng.users[KEY].caps == {"lottery.grant_chance/day/2": {local_day: 2}}
    assert granted(eng, [9]) == [0]
    state, _ = decode_snapshot(eng.snapshot([KEY])[KEY])  # written back as version 2, keyed by id
    assert state.caps == {"lottery.grant_chance/day/2": {local_day: 2}}


PAY = 'function decide(e, ctx) emit("wallet.grant_cash", {amount_cents = e.data.cents, coins = e.data.coins}) end'
R_PAY = {"id": "pay", "on": "task.completed", "script": "pay", "emits": ["wallet.grant_cash"]}


def test_several_budgets_on_one_action_are_all_spent_or_none(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, {"pay": PAY}, [R_PAY], budgets=[
        {"name": "cash", "action": "wallet.grant_cash", "param": "amount_cents", "total": 150},
        {"name": "coins", "action": "wallet.grant_cash", "param": "coins", "total": 1000},
    ])
    evs = [ev(i, user=f"u{i}", type="task.completed", cents=100, coins=10) for i in range(4)]
    out = eng.process(evs, T0)
    assert [len(r["actions"]) for r in out.results] == [1, 0, 0, 0]  # the second would overspend cash
    reasons = {d["refused"][0]["reason"] for d in out.journal if d["refused"]}
    assert reasons == {"budget:cash: cannot cover amount_cents=100"}
    cheap = eng.process([ev(10, user="x", type="task.completed", cents=50, coins=2000)], T0)
    assert not cheap.actions  # cash could cover it, coins cannot: neither is spent
    assert cheap.journal[0]["refused"][0]["reason"] == "budget:coins: cannot cover coins=2000"
    last = eng.process([ev(11, user="y", type="task.completed", cents=50, coins=990)], T0)
    assert len(last.actions) == 1  # exactly what is left of both
    assert eng.budgets.remaining == {("c1", "cash"): 0, ("c1", "coins"): 0}  # type: ignore[attr-defined]


def test_every_budget_parameter_of_an_action_must_be_a_non_negative_integer(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, {"pay": PAY}, [R_PAY], budgets=[
        {"name": "cash", "action": "wallet.grant_cash", "param": "amount_cents", "total": 150},
        {"name": "coins", "action": "wallet.grant_cash", "param": "coins", "total": 1000},
    ])
    out = eng.process([ev(1, type="task.completed", cents=10)], T0)  # coins missing
    assert "budget parameter 'coins' must be a non-negative integer" in out.results[0]["errors"][0]


def test_two_different_script_files_with_one_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "reward.lua").write_text(ALWAYS)
    (tmp_path / "b" / "reward.lua").write_text(ALWAYS.replace("chances = 1", "chances = 2"))
    rules = [{"id": "one", "on": "quiz.answered", "script": "a/reward", "emits": ["lottery.grant_chance"]},
             {"id": "two", "on": "quiz.answered", "script": "b/reward", "emits": ["lottery.grant_chance"]}]
    path = write_config(tmp_path, {}, rules)
    with pytest.raises(ConfigError, match=r"campaigns\[0\]\.rules\[1\]\.script: script name 'reward'"):
        load_config(path)
    rules[1]["script"] = "a/reward"  # one file used by two rules is fine
    load_config(write_config(tmp_path, {}, rules))


def test_a_cap_with_an_explicit_id_whose_period_changes_counts_afresh(tmp_path: Path) -> None:
    a = make_engine(tmp_path, {"always": ALWAYS}, [R_ALWAYS], caps=[{**DAILY_2, "id": "chances"}])
    out = a.process([ev(i) for i in range(3)], T0)
    assert out.journal[2]["refused"][0]["reason"].startswith("cap:chances: at most 2")
    b = restart(a, tmp_path, caps=[{**DAILY_2, "id": "chances", "period": "week"}])  # days and weeks never mix
    assert granted(b, [3, 4, 5]) == [1, 1, 0]
