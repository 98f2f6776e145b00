"""Failures inside live shards, not only kill -9: Redis refusing writes under load, a budget store that raises, a
hostile campaign beside an honest one. Two real ShardCores, each behind its MicroBatcher, on a real redis-server;
producers retry until every event is answered, then a reference model checks that nothing was lost or doubled."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.engine.keys import action_id, key_group, shard_of_group, user_key
from playbus.actors.service.batcher import MicroBatcher
from playbus.actors.service.shard import PreparedBatch, ShardCore
from playbus.actors.store.leases import budget_key
from playbus.actors.store.server import RedisServer
from playbus.config.schema import Config
from tests.support.configs import T0, make_config

LOTTERY = "playbus:actions:lottery"
REWARD = """
function decide(event, ctx)
  local n = ctx:incr("n", 1)
  emit("lottery.grant_chance", {chances = 1, n = n})
  emit("wallet.grant_cash", {amount_cents = 7})
end
"""
HOARD = """
local kept = {}
function decide(event, ctx)
  kept[#kept + 1] = string.rep("x", 300000)
  while true do end
end
"""
CASH = 2_000


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return make_config(
        tmp_path_factory.mktemp("cfg"), {"reward": REWARD},
        [{"id": "reward", "on": "task.completed", "script": "reward",
          "emits": ["lottery.grant_chance", "wallet.grant_cash"]}],
        caps=[{"action": "lottery.grant_chance", "per_user": 1000, "period": "day"}],
        budgets=[{"name": "cash", "action": "wallet.grant_cash", "param": "amount_cents", "total": CASH}],
        targets={"lottery": {"stream": LOTTERY}, "wallet": {"stream": "playbus:actions:wallet"}},
        shards=2, key_groups=16, batch={"max_events": 200, "max_wait_ms": 1})


class Shards:
    """Two shards in this process: ShardCore + MicroBatcher each, as the Ray actor runs them."""

    def __init__(self, config: Config, url: str) -> None:
        self.config = config
        self.cores = [ShardCore(config, i, url) for i in range(config.shards)]
        self.batchers: list[MicroBatcher[PreparedBatch]] = [
            MicroBatcher(c, config.batch.max_events, config.batch.max_wait_ms / 1000) for c in self.cores]

    def shard_of(self, e: dict[str, Any]) -> int:
        kg = key_group(user_key(e["campaign"], e["user"]), self.config.key_groups)
        return shard_of_group(kg, self.config.shards, self.config.key_groups)

    async def send_until_answered(self, events: list[dict[str, Any]], log: list[dict[str, Any]]) -> int:
        """Send each event to its shard until it is answered (a producer retrying with the same ids); the
        number of failed attempts."""
        failures = 0
        todo = list(events)
        while todo:
            by_shard: dict[int, list[dict[str, Any]]] = {}
            for e in todo:
                by_shard.setdefault(self.shard_of(e), []).append(e)
            calls = [self.batchers[s].submit(evs) for s, evs in by_shard.items()]
            replies = await asyncio.gather(*calls, return_exceptions=True)
            todo = []
            for evs, reply in zip(by_shard.values(), replies, strict=True):
                if isinstance(reply, BaseException):
                    failures += 1
                    todo += evs
                else:
                    log.extend(reply)
            if todo:
                await asyncio.sleep(0.05)
        return failures

    def close(self) -> None:
        for b in self.batchers:
            b.close()
        for c in self.cores:
            c.close()


@pytest.fixture
def shards(config: Config, redis_server: RedisServer, clean_redis: Any) -> Iterator[Shards]:
    s = Shards(config, redis_server.url)
    yield s
    s.close()


def events_for(users: int, per_user: int, prefix: str, seed: int) -> list[dict[str, Any]]:
    evs = [{"id": f"{prefix}-{u}-{i}", "campaign": "c1", "user": f"u{u}", "type": "task.completed", "ts": T0}
           for u in range(users) for i in range(per_user)]
    rng = random.Random(seed)
    # A producer's order per user is kept; users interleave at random.
    rng.shuffle(evs)
    evs.sort(key=lambda e: (int(e["id"].rsplit("-", 1)[1]), rng.random()))
    return evs


def check_exactly_once(client: Any, shards: Shards, events: list[dict[str, Any]],
                       answers: list[dict[str, Any]]) -> None:
    """Every event applied once (answered applied once, any later answer a duplicate); each user's counter is
    the number of their events; each lottery action in the stream once, with the id of its cause; the cash
    budget never overspent, and exactly what was granted is gone from it."""
    status = Counter((a["id"], a["status"]) for a in answers)
    for e in events:
        assert status[(e["id"], "applied")] + status[(e["id"], "duplicate")] >= 1, e["id"]
    per_user = Counter(e["user"] for e in events)
    lottery = [json.loads(f[b"action"]) for _, f in client.xrange(LOTTERY)]
    ids = [a["id"] for a in lottery]
    assert len(ids) == len(set(ids)) == len(events)
    assert set(ids) == {action_id("c1", e["user"], e["id"], "reward", 0) for e in events}
    assert sorted(a["params"]["n"] for a in lottery if a["user"] == "u0") == list(range(1, per_user["u0"] + 1))
    cash = [json.loads(f[b"action"]) for _, f in client.xrange("playbus:actions:wallet")]
    spent = sum(a["params"]["amount_cents"] for a in cash)
    assert len({a["id"] for a in cash}) == len(cash) and spent <= CASH
    assert spent == CASH - CASH % 7 or len(cash) == len(events)  # all demand met, or the budget used up
    held = sum(c.budgets.held("c1", "cash") for c in shards.cores)
    assert int(client.get(budget_key("c1", "cash"))) + held + spent <= CASH


def test_redis_refusing_writes_for_a_while_under_load_loses_and_doubles_nothing(
        shards: Shards, clean_redis: Any) -> None:
    events = events_for(users=40, per_user=12, prefix="oom", seed=1)
    answers: list[dict[str, Any]] = []

    async def producer(mine: list[dict[str, Any]]) -> int:
        failures = 0
        for i in range(0, len(mine), 10):  # a steady load: 10 events, a pause, 10 more...
            failures += await shards.send_until_answered(mine[i:i + 10], answers)
            await asyncio.sleep(0.02)
        return failures

    async def main() -> int:
        task = asyncio.gather(*(producer(events[i::4]) for i in range(4)))
        while len(answers) < len(events) // 5:  # the window opens with most of the load still to come
            await asyncio.sleep(0.005)
        used = int(clean_redis.info("memory")["used_memory"])
        clean_redis.config_set("maxmemory", used + 1024)  # every write refused: OOM (noeviction)
        await asyncio.sleep(2.0)
        clean_redis.config_set("maxmemory", 0)
        return sum(await task)

    failures = asyncio.run(main())
    assert failures > 0, "the window of refused writes did not hit any batch"
    check_exactly_once(clean_redis, shards, events, answers)


def test_a_budget_store_that_raises_while_leasing_fails_the_batch_and_nothing_half_done(
        shards: Shards, clean_redis: Any) -> None:
    broken = {"left": 3}
    for core in shards.cores:
        real = core.budgets.refill

        def refill(needs: Any, real: Any = real) -> bool:
            if broken["left"] > 0:
                broken["left"] -= 1
                raise ConnectionError("redis went away while leasing")
            return bool(real(needs))

        core.budgets.refill = refill  # type: ignore[method-assign]
        core.budgets.prefill = lambda: False  # type: ignore[method-assign]  # leases only when a batch is short
    events = events_for(users=30, per_user=10, prefix="lease", seed=2)
    answers: list[dict[str, Any]] = []
    failures = asyncio.run(shards.send_until_answered(events, answers))
    assert failures > 0 and broken["left"] == 0
    check_exactly_once(clean_redis, shards, events, answers)


def test_a_hostile_campaign_beside_an_honest_one_never_fails_the_honest_events(
        redis_server: RedisServer, clean_redis: Any, tmp_path: Path) -> None:
    from tests.support.configs import config_document

    doc = config_document(
        [{"id": "reward", "on": "task.completed", "script": "reward", "emits": ["lottery.grant_chance"]}],
        campaign="honest", targets={"lottery": {"stream": LOTTERY}}, shards=1, key_groups=4,
        sandbox={"max_instructions": 50_000, "max_memory_kb": 2048, "disable_after": 5})
    hostile = config_document([{"id": "hoard", "on": "task.completed", "script": "hoard", "emits": []}],
                              campaign="hostile")["campaigns"][0]
    doc["campaigns"].append(hostile)
    (tmp_path / "reward.lua").write_text(REWARD.replace('  emit("wallet.grant_cash", {amount_cents = 7})\n', ""))
    (tmp_path / "hoard.lua").write_text(HOARD)
    import yaml

    from playbus.config.loader import load_config

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    core = ShardCore(load_config(tmp_path / "c.yaml"), 0, redis_server.url)
    memory = []
    for b in range(10):
        batch = []
        for i in range(30):
            batch.append({"id": f"h{b}-{i}", "campaign": "hostile", "user": f"x{i}", "type": "task.completed",
                          "ts": T0})
            batch.append({"id": f"k{b}-{i}", "campaign": "honest", "user": f"y{i}", "type": "task.completed",
                          "ts": T0})
        results = core.process(batch)
        honest = [r for r, e in zip(results, batch, strict=True) if e["campaign"] == "honest"]
        assert all(r["status"] == "applied" and not r["errors"] and len(r["actions"]) == 1 for r in honest)
        memory.append(core.engine.sandbox.memory_kb())
    assert max(memory) - min(memory) < 4096  # the hoarder kept nothing
    health = core.health()
    assert [d["rule"] for d in health["disabled_rules"]] == ["hoard"] and health["ok"]
    assert clean_redis.xlen(LOTTERY) == 300
    core.close()
