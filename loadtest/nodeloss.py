"""HTTP traffic against a running playbus while Ray nodes are lost, its reference model, and the takeover figures
(tests/e2e/test_multinode.py, loadtest/multinode_soak.py).

The campaign ("nodes"): one rule on `tick`: `ctx.tick.count += 1` and emit `lottery.grant_chance {n}` with n the
new count. Each producer owns its users and sends their events in order, `chunk` events a request, and resends the
same chunk (same ids) until it is answered 200 (a 503 while a shard is taken over, a connection error, a
timeout). So the model knows, for every event, that it must be applied exactly once and which count it makes:

  1. every chunk ends answered 200, each event `applied` or `duplicate` (a retry of one whose answer was lost);
  2. per user, the committed `tick.count` equals the events sent;
  3. the lottery stream holds exactly one action per event, with the expected id and n (a lost event is missing,
     a doubly applied one is there twice or shifts the n of the next).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import redis

from playbus.actors.engine.keys import action_id
from playbus.loadtest.launcher import http_get
from playbus.loadtest.soak import read_stream

__all__ = ["CAMPAIGN", "LOTTERY", "Chunk", "Traffic", "healthz", "wait_taken_over", "write_config"]

CAMPAIGN = "nodes"
LOTTERY = "playbus:actions:lottery"
RULE = "tick"
T0 = 1_769_000_000_000  # inside the campaign window
TICK_LUA = """\
function decide(event, ctx)
  local n = ctx:incr("tick.count", 1)
  emit("lottery.grant_chance", {n = n})
end
"""
CONFIG_YAML = """\
shards: {shards}
key_groups: {key_groups}
batch: {{max_events: 500, max_wait_ms: 2}}
targets:
  lottery: {{stream: "{lottery}"}}
campaigns:
  - id: {campaign}
    timezone: Asia/Shanghai
    starts: 2026-01-01T00:00:00+08:00
    ends: 2036-01-01T00:00:00+08:00
    rules:
      - {{id: {rule}, on: tick, script: tick.lua, emits: [lottery.grant_chance]}}
"""


def write_config(base: Path, shards: int, key_groups: int = 64) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    (base / "tick.lua").write_text(TICK_LUA, encoding="utf-8")
    path = base / "nodes.yaml"
    path.write_text(CONFIG_YAML.format(shards=shards, key_groups=key_groups, lottery=LOTTERY, campaign=CAMPAIGN,
                                       rule=RULE), encoding="utf-8")
    return path


@dataclass
class Chunk:
    """One request's events, sent until answered 200: when first sent, when answered, how many tries."""

    events: list[dict[str, Any]]
    first_sent: float
    done: float = 0.0
    tries: int = 0
    statuses: list[str] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)  # what the retried tries got: "503", "error"...


class Traffic:
    """`producers` producers, each with `users` users of its own, posting `chunk` events a request to `url`."""

    def __init__(self, url: str, producers: int = 3, users: int = 20, chunk: int = 20, pause_s: float = 0.02,
                 request_timeout_s: float = 60.0) -> None:
        self.url = url
        self.producers = producers
        self.users = users
        self.chunk = chunk
        self.pause_s = pause_s
        self.request_timeout_s = request_timeout_s
        self.chunks: list[Chunk] = []
        self.sent: dict[str, list[str]] = {}  # user -> its event ids, in order
        self.stop = threading.Event()  # set from any thread: the producers end after their chunk in flight

    def _user(self, k: int, j: int) -> str:
        return f"n{k}-u{j}"

    async def _produce(self, session: aiohttp.ClientSession, k: int) -> None:
        seq = 0
        while not self.stop.is_set():
            events = []
            for _ in range(self.chunk):
                user = self._user(k, seq % self.users)
                eid = f"n{k}-e{seq}"
                events.append({"id": eid, "campaign": CAMPAIGN, "user": user, "type": RULE, "ts": T0 + seq})
                self.sent.setdefault(user, []).append(eid)
                seq += 1
            chunk = Chunk(events, time.monotonic())
            self.chunks.append(chunk)
            while True:  # until answered: the same ids every time
                chunk.tries += 1
                try:
                    async with session.post("/v1/events", json=events,
                                            timeout=aiohttp.ClientTimeout(total=self.request_timeout_s)) as resp:
                        body = await resp.read()
                        if resp.status == 200:
                            chunk.statuses = [r["status"] for r in json.loads(body)["results"]]
                            break
                        chunk.failures[str(resp.status)] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    chunk.failures[type(e).__name__] += 1
                await asyncio.sleep(0.2)
            chunk.done = time.monotonic()
            await asyncio.sleep(self.pause_s)

    async def run(self) -> None:
        """Produce until `stop` is set; every chunk started is answered before this returns."""
        async with aiohttp.ClientSession(self.url) as session:
            await asyncio.gather(*(self._produce(session, k) for k in range(self.producers)))

    def start(self) -> threading.Thread:
        """run() on an event loop of its own, in a thread (join it after setting `stop`)."""
        thread = threading.Thread(target=lambda: asyncio.run(self.run()), name="playbus-node-loss-traffic",
                                  daemon=True)
        thread.start()
        return thread

    # -- what happened ---------------------------------------------------------------------------------------
    @property
    def events(self) -> int:
        return sum(len(c.events) for c in self.chunks)

    def longest_wait_after(self, t: float) -> float:
        """The longest a producer waited for a chunk's answers after `t` (the kill): from max(first sent, t) to
        answered, retries included. Covers the time the lost node's key groups answered nothing."""
        return max((c.done - max(c.first_sent, t) for c in self.chunks if c.done > t), default=0.0)

    def check(self, url: str, redis_url: str) -> list[str]:
        """The model's checks (module docstring); the problems found, [] when every event was applied once."""
        problems: list[str] = []
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        for c in self.chunks:
            want = [e["id"] for e in c.events]
            if len(c.statuses) != len(want) or any(s not in ("applied", "duplicate") for s in c.statuses):
                problems.append(f"chunk {want[0]}..: answers {Counter(c.statuses)}")
        for user, ids in self.sent.items():
            status, body = http_get(host, int(port), f"/v1/campaigns/{CAMPAIGN}/users/{quote(user, safe='')}/context")
            got = json.loads(body)["context"].get("tick.count") if status == 200 else f"HTTP {status}"
            if got != len(ids):
                problems.append(f"user {user}: tick.count {got}, {len(ids)} events sent")
        expected = {action_id(CAMPAIGN, user, eid, RULE, 0): (user, n)
                    for user, ids in self.sent.items() for n, eid in enumerate(ids, 1)}
        seen: Counter[str] = Counter()
        client: Any = redis.Redis.from_url(redis_url, socket_timeout=30)
        try:
            for action in read_stream(client, LOTTERY):
                if action.get("campaign") != CAMPAIGN:
                    continue
                seen[action["id"]] += 1
                user, n = expected.get(action["id"], ("?", None))
                if n is None:
                    problems.append(f"unknown action {action['id']} (cause {action.get('cause')})")
                elif action["params"] != {"n": n}:
                    problems.append(f"action of user {user}'s event {n}: params {action['params']}, expected n={n}")
        finally:
            client.close()
        doubled = [a for a, k in seen.items() if k > 1]
        missing = [a for a in expected if a not in seen]
        if doubled:
            problems.append(f"{len(doubled)} actions more than once, e.g. {doubled[:3]}")
        if missing:
            problems.append(f"{len(missing)} of {len(expected)} actions missing, e.g. {missing[:3]}")
        return problems


def healthz(url: str, timeout: float = 10) -> tuple[int, list[dict[str, Any]]]:
    """(status, shard entries) of GET /healthz; (0, []) when it does not answer."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    try:
        status, body = http_get(host, int(port), "/healthz", timeout)
        return status, json.loads(body).get("shards", [])
    except (OSError, ValueError):
        return 0, []


def wait_taken_over(url: str, lost: str, since: float, timeout_s: float) -> float | None:
    """Seconds from `since` until /healthz is 200 with no shard on node `lost` (every shard answers and can
    commit again, on a survivor); None if not within timeout_s."""
    while time.monotonic() - since < timeout_s:
        status, shards = healthz(url, 5)
        if status == 200 and shards and all(s.get("ok") and s.get("node") != lost for s in shards):
            return time.monotonic() - since
        time.sleep(0.1)
    return None
