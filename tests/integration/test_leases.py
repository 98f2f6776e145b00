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
            if budgets[i].try_spend("c1", "cash", amount):
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


def test_release_gives_unused_leases_back(clean_redis: Any, tmp_path: Path) -> None:
    budgets = LeasedBudgets(clean_redis, make_config(tmp_path, 10_000), block_fraction=0.05)
    assert budgets.try_spend("c1", "cash", 1)
    assert budgets.held("c1", "cash") == 499  # the rest of a 500 block
    assert budgets.remaining("c1", "cash") == 9_500
    assert budgets.release() == {("c1", "cash"): 499}
    assert budgets.remaining("c1", "cash") == 9_999
    assert budgets.held("c1", "cash") == 0
    assert budgets.release() == {}


def test_asks_for_exactly_what_is_needed_when_a_block_cannot_be_had(clean_redis: Any, tmp_path: Path) -> None:
    budgets = LeasedBudgets(clean_redis, make_config(tmp_path, 1_000), block_fraction=0.5)
    other = LeasedBudgets(clean_redis, make_config(tmp_path, 1_000), block_fraction=0.5)
    assert other.try_spend("c1", "cash", 990)  # leaves 10 in Redis
    assert budgets.try_spend("c1", "cash", 7)  # no block of 500 left: takes exactly 7
    assert budgets.held("c1", "cash") == 0
    assert not budgets.try_spend("c1", "cash", 4)  # 3 left: refused, nothing taken
    assert budgets.remaining("c1", "cash") == 3
    assert budgets.try_spend("c1", "cash", 3)
    assert budgets.remaining("c1", "cash") == 0


def test_refuses_bad_amounts_and_unknown_budgets(clean_redis: Any, tmp_path: Path) -> None:
    budgets = LeasedBudgets(clean_redis, make_config(tmp_path, 100))
    assert not budgets.try_spend("c1", "cash", 101)
    assert not budgets.try_spend("c1", "cash", -1)
    assert not budgets.try_spend("c1", "cash", "5")
    assert not budgets.try_spend("c1", "cash", True)
    assert not budgets.try_spend("c1", "points", 1)
    assert not budgets.try_spend("c2", "cash", 1)
    assert budgets.try_spend("c1", "cash", 2.0)
    assert budgets.remaining("c1", "cash") + budgets.held("c1", "cash") == 98


def test_the_counter_is_initialised_only_once(clean_redis: Any, tmp_path: Path) -> None:
    first = LeasedBudgets(clean_redis, make_config(tmp_path, 500))
    assert first.try_spend("c1", "cash", 100)
    LeasedBudgets(clean_redis, make_config(tmp_path, 500))  # a shard (re)starting later
    LeasedBudgets(clean_redis, make_config(tmp_path, 9_999))  # a changed total is not applied
    assert int(clean_redis.get(budget_key("c1", "cash"))) + first.held("c1", "cash") == 400


@pytest.mark.parametrize("block_fraction", [0.0, 1.5])
def test_block_fraction_is_checked(clean_redis: Any, tmp_path: Path, block_fraction: float) -> None:
    with pytest.raises(ValueError):
        LeasedBudgets(clean_redis, make_config(tmp_path, 100), block_fraction=block_fraction)
