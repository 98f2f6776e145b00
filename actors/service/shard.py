"""ShardCore: one shard's engine joined to Redis (plain Python; the Ray actor in shard_actor.py wraps it).

Per micro-batch: load the users not in memory (one pipelined round trip), decide, then commit the dirty
users, journal, actions and failed runs as one fenced atomic unit per key group (one round trip), and
only then answer. A failed commit forgets the batch's users, so the next attempt reloads them from Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from playbus.actors.engine.budgets import BudgetShortage
from playbus.actors.engine.decisions import Decision, repeat_actions
from playbus.actors.engine.engine import ShardEngine, user_keys
from playbus.actors.engine.keys import group_prefix, groups_of_shard, key_group, user_key
from playbus.actors.store.campaigns import GENERATION as CAMPAIGNS_GENERATION
from playbus.actors.store.campaigns import CampaignState
from playbus.actors.store.catalog import GENERATION as CATALOG_GENERATION
from playbus.actors.store.catalog import ScriptCatalog
from playbus.actors.store.commit import RedisStore
from playbus.actors.store.connect import connect
from playbus.actors.store.durability import check_server
from playbus.actors.store.errors import FencedError
from playbus.actors.store.layout import check_layout
from playbus.actors.store.leases import LeasedBudgets
from playbus.actors.store.recorded import ran_rules
from playbus.actors.store.shardmap import ShardMap
from playbus.config.errors import ConfigError
from playbus.config.loader import parse_campaign, with_campaigns
from playbus.config.schema import Config, campaign_document

__all__ = ["PreparedBatch", "ShardCore", "deploy_scripts", "reload_groups"]

log = logging.getLogger("playbus.shard")
WRITE_PROBE_AFTER_S = 5.0  # after a failed commit, /healthz probes with a write this long after it
CATALOG_CHECK_S = 0.5  # how often a shard compares its scripts with the catalog (activations land within 1 s)


@dataclass
class PreparedBatch:
    """A decided micro-batch and everything its commit writes."""

    results: list[dict[str, Any]]
    dirty: set[str]
    snapshots: dict[str, bytes]
    journal: list[Decision]
    actions: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    size: int  # events decided
    deferred: int = 0  # events at the end left for the next batch (the batch's decide time ran out)
    earlier: list[tuple[int, str, str]] = field(default_factory=list)  # duplicates of earlier batches
    sends: list[Any] = field(default_factory=list)  # (sender's user key, event) for other users' partitions
    timers: list[Any] = field(default_factory=list)  # timer changes, in decision order
    counts: dict[str, int] = field(default_factory=dict)  # sends and timers set, cancelled and fired
    stats: dict[str, int] = field(default_factory=dict)  # once committed: the campaign counters it added
    replayed: list[tuple[str, str]] = field(default_factory=list)  # failed runs replayed (removed with the commit)
    recorded: list[Any] = field(default_factory=list)  # (user key, event) whose rules ran: kept for backtests


class ShardCore:
    """The users of `shard` (its key groups), decided in memory and committed to Redis per batch."""

    def __init__(self, config: Config, shard: int, redis_url: str) -> None:
        self.config = config
        self.shard = shard
        self.client = connect(redis_url, socket_timeout=10, retry_on_timeout=True)
        check_layout(self.client, config.key_groups)
        waitaof = check_server(self.client, config.durability.fsync)
        self.store = RedisStore(self.client, config.key_groups, wait_fsync_ms=5_000 if waitaof else None)
        self.catalog = ScriptCatalog(self.client)
        deploy_scripts(self.catalog, config)  # a changed rule file becomes the active version
        self.generation = self.catalog.generation()
        self._changes = threading.RLock()  # engine changes from the admin (actor) and the prefetch thread
        self.campaign_state = CampaignState(self.client)
        # The running configuration is Redis's: the file's campaigns deployed (an edited one replaces the running
        # one), and those created through the admin API.
        self.campaign_state.deploy_file({c.id: campaign_document(c) for c in config.campaigns})
        self.campaigns_generation = self.campaign_state.generation()
        self.base_config = config
        self._docs = self.campaign_state.configs()
        config = self.config = with_campaigns(config, self._docs, self.catalog.active_sources())
        self.budgets = LeasedBudgets(self.client, config)
        self.engine = ShardEngine(config, budgets=self.budgets, scripts=self.catalog.all())
        self.campaign_state.init_budgets((c.id, b.name, b.total) for c in config.campaigns for b in c.budgets)
        self.campaign_ids = {c.id for c in config.campaigns}  # shared with the partition reader (updated in place)
        self.apply_campaign_state()
        # The shard map says which groups are ours (after a rescale, not the config's contiguous share); without
        # one (a core used alone, in tests and tools), the config's share.
        layout = ShardMap(self.client, config.key_groups).read()
        self.groups = set(layout.groups_of(shard) if layout is not None else
                          groups_of_shard(shard, config.shards, config.key_groups))
        self.max_decide_s = config.batch.max_decide_ms / 1000
        self.stream_targets = {g: t.stream for g, t in config.targets.items() if t.stream}
        self.webhooks = {g for g, t in config.targets.items() if t.webhook}
        self._next_catalog_check = time.monotonic() + CATALOG_CHECK_S
        self.epochs = self.store.claim(sorted(self.groups))
        self.batches = 0
        self.events = 0
        self.counts: dict[str, int] = {}  # sends made, timers set, cancelled and fired (committed)
        self.last_commit_ms = 0.0
        self.commit_ms: deque[float] = deque(maxlen=10_000)  # recent commit latencies, for metrics
        self.fenced = False  # a newer owner claimed (some of) our key groups: this shard must exit
        self.last_commit_error = ""
        self.commit_failed_at = 0.0  # when the last commit failed, if no commit succeeded since

    # -- scripts -----------------------------------------------------------------------------------
    def put_script(self, name: str, source: str, version: int) -> None:
        with self._changes:
            self.engine.put_script(name, source, version)

    def activate(self, name: str, version: int, percent: float = 100) -> None:
        with self._changes:
            self.engine.activate(name, version, percent)

    # -- the micro-batch ---------------------------------------------------------------------------
    def process(self, events: list[Any], now_ms: int | None = None) -> list[dict[str, Any]]:
        """Decide and durably commit one micro-batch; results in input order."""
        batch = self.prepare(events, now_ms)
        try:
            self.commit(batch)
        except Exception:
            # Redis did not take the batch (or this shard was fenced): memory is ahead of Redis, so forget
            # these users; a retry reloads them and dedup (committed with the state) answers what landed.
            self.forget(batch.dirty)
            raise
        return batch.results

    def prepare(self, events: list[Any], now_ms: int | None = None) -> PreparedBatch:
        """Load missing users, decide, and build the commit (no write yet). Runs on the actor's thread.

        The decide loop does no I/O: budgets are spent from local leases. A batch that overdrew a lease is
        rolled back and raises BudgetShortage (the batcher forgets its users, `recover` leases the deficit,
        and the batch is decided again); any failure rolls back this batch's budget spending."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        eng = self.engine
        mark = self.budgets.mark()
        try:
            missing = eng.missing(events)
            if missing:
                for key, blob in self.store.load(missing).items():
                    eng.restore(key, blob)
            outcome = eng.process(events, now, self.max_decide_s)
            deficit = self.budgets.deficit()
            if deficit:
                raise BudgetShortage(
                    "budget leases too short for this batch: " + ", ".join(f"{c}/{b} by {n}" for (c, b), n in
                                                                        sorted(deficit.items())),
                    ";".join(f"{c}\x00{b}={n}" for (c, b), n in deficit.items()))
            dirty = eng.take_dirty()
            return PreparedBatch(outcome.results, dirty, eng.snapshot(dirty), outcome.journal, outcome.actions,
                                 outcome.failed, len(outcome.results), outcome.deferred, outcome.earlier,
                                 outcome.sends, outcome.timers, outcome.counts, replayed=outcome.replayed,
                                 recorded=ran_rules(events, outcome.journal))
        except BaseException:
            self.budgets.rollback(mark)
            raise

    def keys_of(self, events: list[Any]) -> set[str]:
        """The user keys these events touch (whatever their validity)."""
        return set(user_keys(events))

    def recover(self, error: Exception) -> bool:
        """After a failed prepare: lease what a short batch needs (I/O); True if deciding again may succeed."""
        if isinstance(error, BudgetShortage):
            self.budgets.refill(error.amounts())
            return True
        return False

    def needs_prefetch(self) -> bool:
        return time.monotonic() >= self._next_catalog_check or self.budgets.needs_prefill()

    def prefetch(self) -> None:
        """Between batches: top low budget leases up (so that batches rarely overdraw), and every
        CATALOG_CHECK_S reconcile the scripts with the catalog (an activation that missed this shard, a version
        pushed while it restarted)."""
        if time.monotonic() >= self._next_catalog_check:
            self._next_catalog_check = time.monotonic() + CATALOG_CHECK_S
            self.reconcile()
        if self.budgets.needs_prefill():
            self.budgets.prefill()

    def reconcile(self) -> bool:
        """Load what changed in the catalog and in the campaigns' state (paused, budget top-ups) since the last
        look (one round trip when nothing did); True if anything did. Serialized (it runs from the batcher's
        prefetch thread and from the actor when an admin change is pushed): a look that read an older state
        cannot undo a newer one, since the generations are read before the state they stand for."""
        with self._changes:
            return self._reconcile()

    def _reconcile(self) -> bool:
        pipe = self.client.pipeline(transaction=False)
        pipe.get(CATALOG_GENERATION)
        pipe.get(CAMPAIGNS_GENERATION)
        scripts, campaigns = (int(x or 0) for x in pipe.execute())
        changed = False
        if scripts != self.generation:
            self.catalog.install(self.engine)
            self.generation = scripts
            log.info("shard %d: scripts reconciled with the catalog (generation %d)", self.shard, scripts)
            changed = True
        if campaigns != self.campaigns_generation:
            self.apply_campaign_state()
            self.campaigns_generation = campaigns
            changed = True
        return changed

    def apply_campaign_state(self) -> None:
        """Take the campaigns created or replaced through the admin API, pause or resume campaigns as the shared
        state says, and forget which budgets looked exhausted (a top-up may have come)."""
        docs = self.campaign_state.configs()
        changed = [cid for cid, doc in docs.items() if self._docs.get(cid) != doc]
        if changed:
            scripts = self.catalog.active_sources()
            for cid in changed:
                try:
                    camp = parse_campaign(docs[cid], self.base_config, scripts)
                except ConfigError as e:  # checked when it was put; a script since removed, say: keep the old one
                    log.error("shard %d: campaign %s cannot be applied: %s", self.shard, cid, e)
                    continue
                self.budgets.add_campaign(camp)
                self.campaign_state.init_budgets((cid, b.name, b.total) for b in camp.budgets)
                log.info("shard %d: campaign %s %s", self.shard, cid, "replaced" if cid in self._docs else "added")
                self.engine.set_campaign(camp)
                self.campaign_ids.add(cid)
                self._docs[cid] = docs[cid]
        states = self.campaign_state.all()
        for cid in self.engine.campaigns:
            paused = bool(states.get(cid, {}).get("paused", False))
            if self.engine.campaigns[cid].paused != paused:
                self.engine.pause(cid, paused)
                log.info("shard %d: campaign %s %s", self.shard, cid, "paused" if paused else "resumed")
        self.budgets.exhausted.clear()

    def commit(self, batch: PreparedBatch, offsets: dict[int, str] | None = None,
               rejected: dict[int, list[bytes]] | None = None) -> None:
        """Write a prepared batch to Redis. Touches no engine state, so it may run on another thread while
        the next batch is decided; the caller forgets `batch.dirty` if it raises."""
        t = time.perf_counter()
        try:
            self.store.commit(self.epochs, batch.snapshots, batch.journal, batch.actions, batch.failed,
                              self.stream_targets, self.webhooks, offsets=offsets, rejected=rejected,
                              sends=batch.sends, timers=batch.timers, replayed=batch.replayed,
                              recorded=batch.recorded)
        except Exception as e:
            self.fenced = self.fenced or isinstance(e, FencedError)
            self.last_commit_error = f"{type(e).__name__}: {e}"
            self.commit_failed_at = time.monotonic()
            raise
        self.commit_failed_at = 0.0
        batch.stats = self.store.last_stats
        if batch.earlier:  # duplicates answer with their first processing's actions, from the journals
            keys = {key for _, key, _ in batch.earlier}
            repeat_actions(batch.results, batch.earlier, self.store.journals(keys))
        self.last_commit_ms = (time.perf_counter() - t) * 1000
        self.commit_ms.append(self.last_commit_ms)
        self.batches += 1
        self.events += batch.size
        for k, n in batch.counts.items():
            self.counts[k] = self.counts.get(k, 0) + n
        log.debug("shard %d batch %d: %d events, %d actions, commit %.2f ms", self.shard, self.batches,
                  batch.size, len(batch.actions), self.last_commit_ms)

    def preload(self) -> int:
        """Load every committed user of this shard's groups now (a full recovery from Redis) instead of each at
        its next event; on the actor's thread, between batches. The number of users loaded."""
        return reload_groups(self.store, self.engine, sorted(self.groups))

    def forget(self, keys: set[str]) -> None:
        """Drop these users from memory: their next event reloads them from Redis."""
        for k in keys:
            self.engine.evict(k)

    # -- key-group moves -----------------------------------------------------------------------------
    def release(self, groups: Iterable[int]) -> int:
        """Stop owning these groups (their batches committed: the caller saw to it): drop them and their users
        from memory, so that nothing of theirs reaches a later commit. The number of users dropped."""
        gone = set(groups) & self.groups
        # New objects, not changes in place: a commit on the commit thread may be reading the old ones.
        self.groups = self.groups - gone
        self.epochs = {kg: e for kg, e in self.epochs.items() if kg not in gone}
        return self._evict_groups(gone)

    def acquire(self, groups: Iterable[int]) -> dict[int, int]:
        """Own these groups: claim them with a higher epoch (which fences out any older owner), after dropping
        what memory may still hold of them from an earlier ownership; their users load at their next event, and
        the caller starts reading their partitions and timers from the committed offsets. The epochs claimed."""
        new = sorted(set(groups) - self.groups)
        if not new:
            return {}
        self._evict_groups(set(new))
        claimed = self.store.claim(new)
        self.epochs = {**self.epochs, **claimed}
        self.groups = self.groups | set(new)
        return claimed

    def _evict_groups(self, groups: set[int]) -> int:
        if not groups:
            return 0
        n = self.config.key_groups
        keys = [k for k in self.engine.users if key_group(k, n) in groups]
        for k in keys:
            self.engine.evict(k)
        return len(keys)

    def groups_of(self, events: list[Any]) -> set[int]:
        """The key groups of these events (those with a string campaign and user)."""
        n = self.config.key_groups
        return {key_group(k, n) for k in user_keys(events)}

    # -- reads -------------------------------------------------------------------------------------
    def context(self, campaign: str, user: str) -> dict[str, Any]:
        self._ensure_loaded(campaign, user)
        return self.engine.context(campaign, user)

    def _ensure_loaded(self, campaign: str, user: str) -> None:
        key = user_key(campaign, user)
        if key not in self.engine.users:
            self.engine.restore(key, self.store.snapshot_of(key))

    def health(self) -> dict[str, Any]:
        """This shard's state; `ok` is False while it cannot commit (Redis refusing, fenced), or Redis does not
        answer."""
        problems = []
        try:
            self.client.ping()
        except redis.RedisError as e:
            problems.append(f"redis: {e}")
        if self.fenced:
            problems.append("fenced: another owner claimed its key groups")
        elif self.commit_failed_at:
            if time.monotonic() - self.commit_failed_at > WRITE_PROBE_AFTER_S and self._write_probe():
                self.commit_failed_at = 0.0  # Redis takes writes again: the next batch will commit
            else:
                problems.append(f"cannot commit: {self.last_commit_error}")
        disabled = self.engine.sandbox.disabled_rules()
        return {"shard": self.shard, "ok": not problems, "problems": problems, "groups": len(self.groups),
                "users": len(self.engine.users), "batches": self.batches, "events": self.events,
                **{k: self.counts.get(k, 0) for k in ("sent", "timers_set", "timers_cancelled", "fired")},
                "last_commit_ms": self.last_commit_ms,
                "disabled_rules": [{"rule": r, "why": why} for r, why in disabled]}

    def _write_probe(self) -> bool:
        """Whether Redis takes a write in one of this shard's key groups now (after a failed commit)."""
        if not self.groups:
            return True  # nothing to commit
        try:
            self.client.set(group_prefix(min(self.groups)) + "probe", str(time.time()), px=60_000)
            return True
        except redis.RedisError:
            return False

    def close(self) -> None:
        """Give unused budget leases back."""
        try:
            self.budgets.release()
        except redis.RedisError as e:
            log.warning("shard %d: could not release budget leases: %s", self.shard, e)


def deploy_scripts(catalog: ScriptCatalog, config: Config) -> list[tuple[str, int]]:
    """Load every rule's script file into the catalog; the (name, version) pairs that became active."""
    catalog.migrate_legacy()
    deployed: list[tuple[str, int]] = []
    seen: set[str] = set()
    for c in config.campaigns:
        for r in c.rules:
            if r.script_name in seen:
                continue
            seen.add(r.script_name)
            changed, active = catalog.deploy(r.script_name, r.source)
            if changed:
                deployed.append((r.script_name, active))
    return deployed


def reload_groups(store: RedisStore, engine: ShardEngine, groups: Iterable[int], count: int = 5000) -> int:
    """Restore every committed user of these key groups that is not in memory yet (HSCAN of each group's
    snapshots, `count` a round trip): the number restored."""
    users = engine.users
    n = 0
    for kg in groups:
        for key, blob in store.scan_users(kg, count):
            if key not in users:
                engine.restore(key, blob)
                n += 1
    return n
