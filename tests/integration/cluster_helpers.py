"""Helpers of the cluster tests: a small two-shard config, a Cluster of real Ray shard actors driven through
IngressCore, and readers of what landed in Redis (contexts, target streams, outboxes)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from playbus.actors.edge.serve_app import call_with_retry
from playbus.actors.edge.shard_actor import UserActivityActor
from playbus.actors.engine.keys import group_prefix
from playbus.actors.service.http_api import IngressCore
from playbus.config.schema import Config
from tests.support.configs import make_config

CAMPAIGN = "c1"
LOTTERY = "playbus:actions:lottery"
T0 = 1769000000000  # 2026-01-21T20:53:20+08:00, inside the campaign
DAY = 86_400_000
CASH_TOTAL = 20_000
CAP_PER_DAY = 3
JSON = {"content-type": "application/json"}
MSGPACK = {"content-type": "application/msgpack"}

SCRIPTS = {
    # The first quiz answer grants one lottery chance (capped per user per day).
    "first_quiz": """
function decide(event, ctx)
  local n = ctx:incr("quiz.answered", 1)
  if n == 1 then emit("lottery.grant_chance", {chances = 1}) end
end
""",
    # Hostile: writes and emits, then never returns; the instruction budget must stop it alone.
    "loop_forever": """
function decide(event, ctx)
  ctx:set("evil.touched", true)
  emit("lottery.grant_chance", {chances = 1})
  while true do end
end
""",
    # A well-behaved second rule on the same event: it must still run and commit.
    "count_evil": """
function decide(event, ctx)
  ctx:incr("evil.count", 1)
end
""",
    # Load: count every tick; a tick with data.lottery emits an (uncapped) lottery ticket.
    "tick": """
function decide(event, ctx)
  ctx:incr("tick.count", 1)
  if event.data.lottery then emit("lottery.grant_ticket", {tickets = 1}) end
end
""",
    # Caps and budget: every task asks for a capped lottery chance and for cash from the shared budget.
    "reward": """
function decide(event, ctx)
  ctx:incr("task.completed", 1)
  emit("lottery.grant_chance", {chances = 1})
  emit("wallet.grant_cash", {amount_cents = math.tointeger(event.data.cents)})
end
""",
}

RULES = [
    {"id": "first_quiz", "on": "quiz.answered", "script": "first_quiz", "emits": ["lottery.grant_chance"]},
    {"id": "loop_forever", "on": "evil.loop", "script": "loop_forever", "emits": ["lottery.grant_chance"]},
    {"id": "count_evil", "on": "evil.loop", "script": "count_evil", "emits": []},
    {"id": "tick", "on": "tick", "script": "tick", "emits": ["lottery.grant_ticket"]},
    {"id": "reward", "on": "task.completed", "script": "reward",
     "emits": ["lottery.grant_chance", "wallet.grant_cash"]},
]


def make_cluster_config(tmp: Path) -> Config:
    return make_config(
        tmp, SCRIPTS, RULES, name="cluster.yaml", campaign=CAMPAIGN,
        starts="2026-01-01T00:00:00+08:00", ends="2027-01-01T00:00:00+08:00",
        targets={"lottery": {"stream": LOTTERY}, "wallet": {"webhook": "http://127.0.0.1:9/grant"}},
        caps=[{"action": "lottery.grant_chance", "per_user": CAP_PER_DAY, "period": "day"}],
        budgets=[{"name": "cash", "action": "wallet.grant_cash", "param": "amount_cents", "total": CASH_TOTAL}],
        shards=2, key_groups=16, dedup_window=256, batch={"max_events": 500, "max_wait_ms": 2},
        sandbox={"max_instructions": 200000, "max_memory_kb": 4096})


def event(eid: str, user: str, type: str = "tick", ts: int = T0, **data: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"id": eid, "campaign": CAMPAIGN, "user": user, "type": type, "ts": ts}
    if data:
        e["data"] = data
    return e


def _getpid_fn() -> Any:
    # A lambda is pickled by value, so the worker needs no import of the test modules.
    return lambda _actor: os.getpid()


class Cluster:
    """Real UserActivityActor shards on the test's Redis, and an IngressCore routing to them."""

    def __init__(self, config: Config, redis_url: str) -> None:
        self.config = config
        self.redis_url = redis_url
        self.shards: list[Any] = []
        self.core: IngressCore | None = None

    def start(self) -> IngressCore:
        self.shards = [UserActivityActor.remote(self.config, i, self.redis_url) for i in range(self.config.shards)]
        ray.get([s.health.remote() for s in self.shards], timeout=120)
        shards = self.shards

        async def call(i: int, method: str, args: Sequence[Any]) -> Any:
            return await call_with_retry(shards[i], method, args)

        self.core = IngressCore(self.config, call, self.redis_url)
        return self.core

    def stop(self) -> None:
        """Kill every shard actor for good (no restart) and wait until each is reported dead."""
        for s in self.shards:
            ray.kill(s, no_restart=True)
        deadline = time.monotonic() + 60
        for s in self.shards:
            while True:
                try:
                    ray.get(s.health.remote(), timeout=2)
                except RayActorError:
                    break
                except GetTimeoutError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("a killed shard actor still answers")
                time.sleep(0.05)
        self.shards = []
        if self.core is not None:
            self.core.client.close()
            self.core = None

    def restart(self) -> IngressCore:
        self.stop()
        return self.start()

    async def pid(self, shard: int) -> int:
        """The OS process id of a shard's worker (waiting, through call_with_retry, while it restarts)."""
        return int(await call_with_retry(self.shards[shard], "__ray_call__", (_getpid_fn(),)))


async def post(core: IngressCore, events: Any, fmt: str = "json") -> tuple[int, dict[str, Any]]:
    """POST /v1/events; (status, decoded JSON body)."""
    if fmt == "json":
        body, headers = json.dumps(events).encode(), JSON
    else:
        body, headers = msgpack.packb(events), MSGPACK
    status, _, out = await core.handle("POST", "/v1/events", "", headers, body)
    return status, json.loads(out)


async def post_until_ok(core: IngressCore, events: list[Any], attempts: int = 100) -> tuple[list[Any], int]:
    """A retrying producer: re-send the same events until answered 200; (results, failed attempts)."""
    failures = 0
    for _ in range(attempts):
        status, doc = await post(core, events, "msgpack")
        if status == 200:
            return doc["results"], failures
        failures += 1
        await asyncio.sleep(0.1)
    raise AssertionError(f"no 200 after {attempts} attempts; last answer {status}: {doc}")


def statuses(results: list[dict[str, Any]]) -> list[str]:
    return [r["status"] for r in results]


def stream_actions(client: Any, stream: str = LOTTERY) -> list[dict[str, Any]]:
    """Every action in a target stream, in stream order."""
    return [json.loads(fields[b"action"]) for _, fields in client.xrange(stream)]


def outbox_actions(client: Any, key_groups: int) -> list[dict[str, Any]]:
    """Every action in the key groups' outboxes (webhook targets)."""
    out: list[dict[str, Any]] = []
    for kg in range(key_groups):
        out += [json.loads(f[b"action"]) for _, f in client.xrange(group_prefix(kg) + "outbox")]
    return out


def failed_runs(client: Any, key_groups: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for kg in range(key_groups):
        out += [json.loads(f[b"entry"]) for _, f in client.xrange(group_prefix(kg) + "failed")]
    return out


async def context_of(core: IngressCore, user: str) -> dict[str, Any]:
    """The user's committed context, read through GET .../context (Redis, not shard memory)."""
    status, _, body = await core.handle("GET", f"/v1/campaigns/{CAMPAIGN}/users/{user}/context", "", {}, b"")
    assert status == 200, body
    doc = json.loads(body)
    assert doc["campaign"] == CAMPAIGN and doc["user"] == user
    return doc["context"]  # type: ignore[no-any-return]


def redis_fingerprint(client: Any) -> dict[bytes, bytes]:
    """Every key's serialized value (DUMP): equal fingerprints mean nothing was written in between."""
    return {k: client.dump(k) for k in sorted(client.keys("*"))}
