"""LeasedBudgets against a real redis-server: shards spending one budget never overspend it."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.store.leases import LeasedBudgets, budget_key
from playbus.actors.store.server import RedisServer
from playbus.config import Config
from tests.support.configs import make_config as build

PAY = 'function decide(event, ctx) emit("wallet.grant_cash", {amount_cents = 1}) end'


def spend(budgets: LeasedBudgets, amount: object, budget: str = "cash", campaign: str = "c1") -> bool:
    """What a shard does around one decide: spend locally; when the lease was overdrawn, roll back, lease the
    deficit, and decide again."""
    for _ in range(3):
        mark = budgets.mark()
        refused = budgets.try_spend(campaign, [(budget, amount)])
        deficit = budgets.deficit()
        if not deficit:
            return not refused
        budgets.rollback(mark)
        budgets.refill(deficit)
    raise AssertionError("still short after three refills")


def make_config(tmp_path: Path, total: int) -> Config:
    return build(tmp_path, {"pay": PAY}, [{"id": "pay", "on": "task.completed", "script": "pay",
                                          "emits": ["wallet.grant_cash"]}],
                 budgets=[{"name": "cash", "action": "wallet.grant_cash", "param": "amount_cents", "total": total}])


def spend_concurrently(server: RedisServer, config: Config, shards: int, max_amount: int,
                       seed: int) -> tuple[int, list[LeasedBudgets], list[Any]]:
    """`shards` instances, each on its own connection and thread, spend random amounts until refused
    20 times in a row; returns the total granted."""
    clients = [server.client() for _ in range(shards)]
    budgets = [LeasedBudgets(c, config) for c in clients]
    spent = [0] * shards
    start = threading.Barrier(shards)

    def shard(i: int) -> None:
        rng = random.Random(seed + i)
        start.wait()
        refusals = 0
        while refusals < 20:
            amount = rng.randint(1, max_amount)
            if spend(budgets[i], amount):
                spent[i] += amount
                refusals = 0
            else:
                refusals += 1

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return sum(spent), budgets, clients


def test_four_shards_never_overspend_and_use_nearly_all(redis_server: RedisServer, clean_redis: Any,
                                                       tmp_path: Path) -> None:
    total = 200_000
    config = make_config(tmp_path, total)
    spent, budgets, clients = spend_concurrently(redis_server, config, 4, 100, seed=1)
    held = sum(b.held("c1", "cash") for b in budgets)
    assert spent <= total
    assert spent >= 0.97 * total
    assert spent + held + budgets[0].remaining("c1", "cash") == total
    assert sum(b.round_trips for b in budgets) < total // 100  # leases, not a call per grant
    for b in budgets:
        b.release()
    assert budgets[0].remaining("c1", "cash") == total - spent
    for c in clients:
        c.close()


def test_small_budget_is_never_overspent_under_contention(redis_server: RedisServer, clean_redis: Any,
                                                          tmp_path: Path) -> None:
    for seed in range(3):
        clean_redis.flushall()
        config = make_config(tmp_path, 997)
        spent, budgets, clients = spend_concurrently(redis_server, config, 6, 60, seed=seed * 10)
        assert spent <= 997
        assert spent + sum(b.held("c1", "cash") for b in budgets) + budgets[0].remaining("c1", "cash") == 997
        for c in clients:
            c.close()


def test_spending_does_no_io_and_an_overdraft_is_covered_by_one_refill(clean_redis: Any, tmp_path: Path) -> None:
    budgets = LeasedBudgets(clean_redis, make_config(tmp_path, 10_000), block_fraction=0.05)
    trips = budgets.round_trips
    mark = budgets.mark()
    for _ in range(3):  # a batch of three grants of 100 on an empty lease: no Redis call, an overdraft
        assert budgets.try_spend("c1", [("cash", 100)]) == ""
    assert budgets.round_trips == trips and budgets.deficit() == {("c1", "cash"): 300}
    budgets.rollback(mark)
    assert budgets.refill(budgets.deficit() or {("c1", "cash"): 300})
    # the deficit and a block of 500, at most a 1/16 share of what Redis holds
    assert budgets.held("c1", "cash") == 625 and budgets.remaining("c1", "cash") == 9_375


def test_prefill_tops_a_low_lease_up_between_batches(clean_redis: Any, tmp_path: Path) -> None:
    budgets = LeasedBudgets(clean_redis, make_config(tmp_path, 10_000), block_fraction=0.05)
    assert budgets.needs_prefill()
    assert budgets.prefill() and budgets.held("c1", "cash") == 500
    assert not budgets.needs_prefill()
    assert budgets.try_spend("c1", [("cash", 300)]) == "" and budgets.needs_prefill()


def test_release_gives_unused_leases_back(clean_redis: Any, tmp_path: Path) -> None:
    budgets = LeasedBudgets(clean_redis, make_config(tmp_path, 10_000), block_fraction=0.05)
    assert spend(budgets, 1)
    assert budgets.held("c1", "cash") == 500  # a 500 block on top of the 1 needed, 1 spent
    assert budgets.remaining("c1", "cash") == 9_499
    assert budgets.release() == {("c1", "cash"): 500}
    assert budgets.remaining("c1", "cash") == 9_999
    assert budgets.held("c1", "cash") == 0
    assert budgets.release() == {}


def test_takes_what_is_left_when_a_block_cannot_be_had_then_refuses(clean_redis: Any, tmp_path: Path) -> None:
    budgets = LeasedBudgets(clean_redis, make_config(tmp_path, 1_000), block_fraction=0.5)
    other = LeasedBudgets(clean_redis, make_config(tmp_path, 1_000), block_fraction=0.5)
    assert spend(other, 990)  # leaves 10 in Redis
    assert spend(budgets, 7)  # no block of 500 left: takes what it needs or what is left
    assert budgets.held("c1", "cash") + budgets.remaining("c1", "cash") == 3
    assert not spend(budgets, 4)  # 3 left: refused
    assert spend(budgets, 3)
    assert budgets.remaining("c1", "cash") + budgets.held("c1", "cash") == 0
    assert not spend(budgets, 1) and budgets.round_trips < 12


def test_an_exhausted_budget_is_looked_at_again_after_a_while(clean_redis: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    budgets = LeasedBudgets(clean_redis, make_config(tmp_path, 10), block_fraction=1)
    assert spend(budgets, 10) and not spend(budgets, 1)
    assert not budgets.needs_prefill()  # believed exhausted for a while
    clean_redis.incrby(budget_key("c1", "cash"), 50)  # an operator's top-up
    monkeypatch.setattr("playbus.actors.store.leases.RECHECK_S", 0.0)
    assert budgets.needs_prefill() and budgets.prefill()
    assert spend(budgets, 1)


def test_refuses_bad_amounts_and_unknown_budgets(clean_redis: Any, tmp_path: Path) -> None:
    budgets = LeasedBudgets(clean_redis, make_config(tmp_path, 100))
    assert not spend(budgets, 101)
    assert not spend(budgets, -1)
    assert not spend(budgets, "5")
    assert not spend(budgets, True)
    assert not spend(budgets, 2.0)
    assert not spend(budgets, 1, budget="points")
    assert not spend(budgets, 1, campaign="c2")
    assert spend(budgets, 2)
    assert budgets.remaining("c1", "cash") + budgets.held("c1", "cash") == 98


def test_the_counter_is_initialised_only_once(clean_redis: Any, tmp_path: Path) -> None:
    first = LeasedBudgets(clean_redis, make_config(tmp_path, 500))
    assert spend(first, 100)
    LeasedBudgets(clean_redis, make_config(tmp_path, 500))  # a shard (re)starting later
    LeasedBudgets(clean_redis, make_config(tmp_path, 9_999))  # a changed total is not applied
    assert int(clean_redis.get(budget_key("c1", "cash"))) + first.held("c1", "cash") == 400


@pytest.mark.parametrize("block_fraction", [0.0, 1.5])
def test_block_fraction_is_checked(clean_redis: Any, tmp_path: Path, block_fraction: float) -> None:
    with pytest.raises(ValueError):
        LeasedBudgets(clean_redis, make_config(tmp_path, 100), block_fraction=block_fraction)
