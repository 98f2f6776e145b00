"""Failed rule runs and their replay (补单) on a real Redis without Ray: each replayed once on the active version,
its effects exactly once through a second replay and a replay that crashed half-way, a run that fails again kept."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.service import admin_failed
from playbus.actors.service.admin_failed import FailedRunsAdmin
from playbus.actors.service.shard import ShardCore
from playbus.actors.store.audit import AuditLog
from playbus.actors.store.failed import FailedRuns
from playbus.actors.store.server import RedisServer
from playbus.config.schema import Config
from tests.support.configs import make_config

BROKEN = """
function decide(e, ctx)
  ctx:incr("seen", 1)
  if e.data.tier == nil then error("tier missing") end
  emit("lottery.grant_chance", {chances = e.data.tier})
end
"""
FIXED = """
function decide(e, ctx)
  ctx:incr("seen", 1)
  emit("lottery.grant_chance", {chances = e.data.tier or 1})
end
"""
COUNT = 'function decide(e, ctx) ctx:incr("count", 1) end'


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, {"reward": BROKEN, "count": COUNT},
                       [{"id": "reward", "on": "task.completed", "script": "reward", "emits": ["lottery.grant_chance"]},
                        {"id": "count", "on": "task.completed", "script": "count"}],
                       campaign="c1", starts="2026-01-01T00:00:00+08:00", ends="2028-01-01T00:00:00+08:00",
                       shards=1, key_groups=4)


def ev(i: int, **data: Any) -> dict[str, Any]:
    return {"id": f"e{i}", "campaign": "c1", "user": f"u{i % 3}", "type": "task.completed",
            "ts": int(time.time() * 1000), "data": data}


def lottery(client: Any) -> list[dict[str, Any]]:
    return [json.loads(f[b"action"]) for _, f in client.xrange("playbus:actions:lottery")]


def test_replay_runs_each_failed_rule_once_on_the_active_version(clean_redis: Any, config: Config,
                                                                  redis_server: RedisServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    core = ShardCore(config, 0, redis_server.url)
    results = core.process([ev(i) for i in range(6)] + [ev(6, tier=3)])
    assert [bool(r["errors"]) for r in results] == [True] * 6 + [False]
    failed = FailedRuns(clean_redis, 4)
    runs = failed.list("c1", "reward")
    assert len(runs) == 6 and {r["error"] for r in runs} == {"reward:4: tier missing"}
    assert failed.list("c1", "count") == [] and failed.list("other") == []
    calls = {"n": 0, "crash_at": 2}

    async def call_shard(shard: int, method: str, args: Any) -> Any:
        assert (shard, method) == (0, "process_events")
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise ConnectionError("the shard died in the middle of the replay")
        return core.process(args[0])

    admin = FailedRunsAdmin(config, clean_redis, call_shard, AuditLog(clean_redis),
                            lambda: {("c1", "reward"): core.engine.scripts.active("reward")[0]})

    def replay() -> tuple[int, dict[str, Any]]:
        status, _, body = asyncio.run(admin.handle("POST", "/v1/failed/replay", "", "ops",
                                                   json.dumps({"campaign": "c1", "rule": "reward"}).encode()))
        return status, json.loads(body)

    # Still broken: every replay fails again, and every entry stays; replayed again on the same version, each
    # is a duplicate (tried already).
    calls["crash_at"] = 0
    status, got = replay()
    assert status == 200 and (got["found"], got["replayed"], got["failed_again"]) == (6, 0, 6)
    assert len(failed.list("c1", "reward")) == 6
    status, got = replay()
    assert (got["found"], got["replayed"], got["already_replayed"]) == (6, 0, 6)
    # Fixed (a new active version); the replay crashes after its first chunk of 2, then runs again.
    core.put_script("reward", FIXED, 2)
    core.activate("reward", 2)
    monkeypatch.setattr(admin_failed, "CHUNK", 2)
    calls["n"], calls["crash_at"] = 0, 2
    with pytest.raises(ConnectionError):
        replay()
    assert len(failed.list("c1", "reward")) == 4  # the first chunk committed: its entries are gone
    calls["crash_at"] = 0
    status, got = replay()
    assert (got["found"], got["replayed"], got["failed_again"]) == (4, 4, 0)
    assert failed.list("c1", "reward") == []
    status, got = replay()  # once more: nothing left
    assert got["found"] == 0 and got["actions"] == []
    # Effects exactly once: one chance per failed run (tier 1 by the fix) beside the tier-3 one; only the rule
    # that failed ran again (count ran once per event); each replay decided on version 2.
    chances = [a for a in lottery(clean_redis)]
    assert sorted(a["params"]["chances"] for a in chances) == [1] * 6 + [3]
    assert len({a["id"] for a in chances}) == 7
    assert {a["script_version"] for a in chances if a["params"]["chances"] == 1} == {2}
    assert {a["cause"][:2] for a in chances if a["params"]["chances"] == 1} == {"r-"}
    assert sum(core.context("c1", f"u{i}").get("count", 0) for i in range(3)) == 7
    # seen: the tier-3 run and the 6 replays (a failed run's writes are discarded)
    assert sum(core.context("c1", f"u{i}").get("seen", 0) for i in range(3)) == 1 + 6
    entry = AuditLog(clean_redis).recent(1)[0]
    assert (entry["who"], entry["action"], entry["target"]) == ("ops", "failed.replay", "c1/reward")


def test_the_failed_runs_listing_answers_its_filters_and_bad_input(clean_redis: Any, config: Config,
                                                                   redis_server: RedisServer) -> None:
    core = ShardCore(config, 0, redis_server.url)
    core.process([ev(i) for i in range(3)])

    async def no_shard(shard: int, method: str, args: Any) -> Any:
        raise AssertionError("listing calls no shard")

    admin = FailedRunsAdmin(config, clean_redis, no_shard, AuditLog(clean_redis), lambda: {("c1", "reward"): 1})

    def call(method: str, path: str, query: str = "", body: bytes = b"") -> tuple[int, Any]:
        status, _, out = asyncio.run(admin.handle(method, path, query, "ops", body))
        return status, json.loads(out)

    status, got = call("GET", "/v1/failed", "campaign=c1&limit=2")
    assert status == 200 and len(got["failed"]) == 2
    assert set(got["failed"][0]) == {"id", "event", "rule", "script_version", "error", "at"}
    assert got["failed"][0]["at"] >= got["failed"][1]["at"]
    assert call("GET", "/v1/failed", "limit=x")[0] == 400
    assert call("POST", "/v1/failed/replay", body=b"{}")[0] == 400
    assert call("POST", "/v1/failed/replay", body=b'{"campaign": "c1", "rule": 5}')[0] == 400
    assert call("GET", "/v1/failed/replay")[0] == 405
