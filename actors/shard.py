"""ShardCore: one shard's engine joined to Redis (plain Python; the Ray actor in shard_actor.py wraps it).

Per micro-batch: load the users not in memory (one pipelined round trip), decide, then commit the dirty
users, journal, actions and failed runs as one fenced atomic unit per key group (one round trip), and
only then answer. A failed commit forgets the batch's users, so the next attempt reloads them from Redis.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import redis

from actors.catalog import ScriptCatalog
from actors.engine import ShardEngine, user_key
from actors.keygroups import groups_of_shard
from actors.leases import LeasedBudgets
from actors.store import FencedError, RedisStore
from config.schema import Config

__all__ = ["ShardCore"]

log = logging.getLogger("playbus.shard")


class ShardCore:
    """The users of `shard` (its key groups), decided in memory and committed to Redis per batch."""

    def __init__(self, config: Config, shard: int, redis_url: str) -> None:
        self.config = config
        self.shard = shard
        self.client = redis.Redis.from_url(redis_url, socket_timeout=10, retry_on_timeout=True)
        self.store = RedisStore(self.client, config.key_groups)
        self.catalog = ScriptCatalog(self.client)
        self.budgets = LeasedBudgets(self.client, config)
        self.engine = ShardEngine(config, budgets=self.budgets)
        self.groups = set(groups_of_shard(shard, config.shards, config.key_groups))
        self.stream_targets = {g: t.stream for g, t in config.targets.items() if t.stream}
        self.webhooks = {g for g, t in config.targets.items() if t.webhook}
        self._load_scripts()
        self.epochs = self.store.claim(sorted(self.groups))
        self.batches = 0
        self.events = 0
        self.last_commit_ms = 0.0
        self.commit_ms: deque[float] = deque(maxlen=10_000)  # recent commit latencies, for metrics

    def _load_scripts(self) -> None:
        """Seed each rule's file as version 1, then load every stored version and the active ones."""
        for c in self.config.campaigns:
            for r in c.rules:
                self.catalog.seed(r.script_name, r.source)
        for s in self.catalog.all():
            for v, source in s["versions"].items():
                self.engine.put_script(s["name"], source, v)
            if s["active"]:
                self.engine.activate(s["name"], s["active"])

    # -- scripts -----------------------------------------------------------------------------------
    def put_script(self, name: str, source: str, version: int) -> None:
        self.engine.put_script(name, source, version)

    def activate(self, name: str, version: int) -> None:
        self.engine.activate(name, version)

    # -- the micro-batch ---------------------------------------------------------------------------
    def process(self, events: list[Any], now_ms: int | None = None) -> list[dict[str, Any]]:
        """Decide and durably commit one micro-batch; results in input order."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        eng = self.engine
        missing = eng.missing(events)
        if missing:
            for key, blob in self.store.load(missing).items():
                eng.restore(key, blob)
        outcome = eng.process(events, now)
        dirty = eng.take_dirty()
        snaps = eng.snapshot(dirty)
        t = time.perf_counter()
        try:
            self.store.commit(self.epochs, snaps, outcome.journal, outcome.actions, outcome.failed,
                              self.stream_targets, self.webhooks)
        except FencedError:
            self._forget(dirty)
            raise
        except Exception:
            # Redis did not take the batch: memory is ahead of Redis, so forget these users; a retry
            # reloads them and dedup (committed with the state) answers what did land.
            self._forget(dirty)
            raise
        self.last_commit_ms = (time.perf_counter() - t) * 1000
        self.commit_ms.append(self.last_commit_ms)
        self.batches += 1
        self.events += len(events)
        log.debug("shard %d batch %d: %d events, %d actions, commit %.2f ms", self.shard, self.batches,
                  len(events), len(outcome.actions), self.last_commit_ms)
        return outcome.results

    def _forget(self, keys: set[str]) -> None:
        for k in keys:
            self.engine.evict(k)

    # -- reads -------------------------------------------------------------------------------------
    def context(self, campaign: str, user: str) -> dict[str, Any]:
        key = user_key(campaign, user)
        if key not in self.engine.users:
            self.engine.restore(key, self.store.snapshot_of(key))
        return self.engine.context(campaign, user)

    def health(self) -> dict[str, Any]:
        self.client.ping()
        return {"shard": self.shard, "groups": len(self.groups), "users": len(self.engine.users),
                "batches": self.batches, "events": self.events, "last_commit_ms": self.last_commit_ms}

    def close(self) -> None:
        """Give unused budget leases back."""
        try:
            self.budgets.release()
        except redis.RedisError as e:
            log.warning("shard %d: could not release budget leases: %s", self.shard, e)
