"""ShardEngine: the whole decision engine for the users of one shard, in plain Python (no Ray, no Redis).

One call to `process` is one micro-batch: validate, dedup, run every matching rule (all rule runs of the
batch cross into Lua in one call), apply caps and budgets, and return results, actions, journal entries
and the users whose state changed. Decisions depend only on (event, context, script version).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

import msgpack
import msgspec

from playbus.actors.engine.budgets import Budgets, LocalBudgets
from playbus.actors.engine.caps import CapBook
from playbus.actors.engine.clock import CampaignClock
from playbus.actors.engine.decisions import Decision
from playbus.actors.engine.events import MAX_TS, NO_DATA, EventIn, Fired, Rejected, Replay, check_event
from playbus.actors.engine.keys import action_id, derived_event_id, user_key
from playbus.actors.engine.state import (
    _DIGEST,
    _STAMP,
    UserState,
    decode_snapshot,
    encode_snapshot,
    pending_timers,
)
from playbus.config.schema import CampaignConfig, Config, RuleConfig
from playbus.scripting.registry import ScriptRegistry
from playbus.scripting.sandbox import Sandbox

__all__ = ["MAX_PENDING_TIMERS", "BatchOutcome", "ShardEngine", "TimerOp", "canary_bucket", "user_keys"]

MAX_PENDING_TIMERS = 256  # timers one user may have pending in one campaign; a `later` past it is refused
_pack_data = msgspec.msgpack.Encoder().encode


def canary_bucket(campaign: str, user: str) -> int:
    """A user's canary bucket, 0..9999, stable for life: FNV-1a (64 bits) of campaign NUL user, shifted right once,
    modulo 10000 (the sandbox's driver.lua computes the same to pick the script)."""
    h = 0xCBF29CE484222325
    for b in f"{campaign}\x00{user}".encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return (h >> 1) % 10000


def user_keys(events: list[Any]) -> list[str]:
    """The user key of every event that names a campaign and a user (EventIn, or a dict with string ones)."""
    out = []
    for e in events:
        if type(e) is EventIn or type(e) is Fired or type(e) is Replay:
            out.append(f"{e.campaign}\x00{e.user}")  # = keys.user_key, inlined per event
        elif type(e) is dict:
            c, u = e.get("campaign"), e.get("user")
            if type(c) is str and type(u) is str:
                out.append(user_key(c, u))
    return out

def _applied_before(events: list[Any], results: list[dict[str, Any]], upto: int,
                    now_ms: int) -> dict[tuple[str, str], dict[str, Any]]:
    """(user key, event id) -> result of the events of this batch before `upto` that were applied: where a
    duplicate of this batch finds its original (built only when a batch has a duplicate)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for raw, res in zip(events[:upto], results, strict=False):
        if res is None or res["status"] != "applied":
            continue
        if type(raw) is EventIn or type(raw) is Fired or type(raw) is Replay:
            campaign, user = raw.campaign, raw.user
        else:
            ev = check_event(raw, now_ms)[0]
            assert ev is not None  # it was applied
            campaign, user = ev.campaign, ev.user
        out.setdefault((user_key(campaign, user), res["id"]), res)
    return out


_new = tuple.__new__
_NONE: tuple[()] = ()  # no actions, no refusals: one shared empty value (journal entries are never mutated)
_NO_CHANGES: dict[str, Any] = {}  # likewise, the changes of a run that wrote nothing
CHUNK_RUNS = 256  # with a time budget, rules run in chunks of about this many runs, the time checked between


# One change to a key group's timers, in decision order: ("set", user key, event id, due ms, the Fired event) or
# ("del", user key, event id, 0, None).
TimerOp = tuple[str, str, str, int, Fired | None]


@dataclass
class BatchOutcome:
    """What one micro-batch decided; `results` are in input order (the first len(events) - deferred of them).

    A duplicate repeats the actions of its first processing: `same_batch` pairs (duplicate, original) of this
    batch (filled in); `earlier` lists (index, user key, event id) of duplicates of earlier batches, whose
    actions are in the user's journal (the shard reads them there)."""

    results: list[dict[str, Any]]
    actions: list[dict[str, Any]] = field(default_factory=list)
    journal: list[Decision] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)
    deferred: int = 0
    same_batch: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    earlier: list[tuple[int, str, str]] = field(default_factory=list)
    sends: list[tuple[str, EventIn]] = field(default_factory=list)  # (sender's user key, event made by `send`)
    timers: list[TimerOp] = field(default_factory=list)  # in decision order
    counts: dict[str, int] = field(default_factory=dict)  # "sent", "timers_set", "timers_cancelled", "fired"
    replayed: list[tuple[str, str]] = field(default_factory=list)  # (user key, failed-runs entry) run successfully


@dataclass
class _Rule:
    id: str
    script: str
    handle: int
    version: int
    canary_version: int = 0  # with canary_bp > 0: the version users of a bucket below canary_bp run
    canary_bp: int = 0


@dataclass
class _RuleSet:
    handle: int
    rules: list[_Rule]
    size: int
    type: str
    made: bool = False  # events of this type are made by the campaign's rules (send, later): none from outside
    canary: bool = False  # some rule of the set runs a canary version for part of the users


@dataclass
class _Campaign:
    config: CampaignConfig
    id: str
    id_b: bytes
    starts_ms: int
    ends_ms: int
    clock: CampaignClock
    caps: CapBook
    budgets: dict[str, list[tuple[str, str]]]  # action type -> [(budget name, param)]: all spent, or none
    rulesets: dict[str, _RuleSet]
    offsets: dict[int, int]  # the clock's cache of UTC offsets per quarter hour, read inline per event
    paused: bool = False  # a kill switch: events applied with no rule run (the window is made empty)
    singles: dict[tuple[str, str], _RuleSet] = field(default_factory=dict)  # (rule, type) -> that rule alone


class ShardEngine:
    """Decides for the users it holds; state is in memory, snapshots are msgpack bytes per user."""

    def __init__(self, config: Config, budgets: Budgets | None = None, sandbox: Sandbox | None = None,
                 scripts: Iterable[Mapping[str, Any]] = ()) -> None:
        """`scripts`: stored versions to start from ({"name", "active", "versions": {N: source}, "canary"} each, as
        the script catalog lists them); a rule whose script is not among them runs its file as version 1."""
        self.config = config
        self.budgets: Budgets = budgets if budgets is not None else LocalBudgets(config)
        lim = config.sandbox
        self.sandbox = sandbox or Sandbox(lim.max_instructions, lim.max_memory_kb, max_context_kb=lim.max_context_kb,
                                          disable_after=lim.disable_after)
        self.scripts = ScriptRegistry(self.sandbox)
        self._pending_canaries: list[tuple[str, int, float]] = []
        for s in scripts:
            for v, source in s["versions"].items():
                self.scripts.add(s["name"], source, v)
            if s["active"]:
                self.scripts.activate(s["name"], s["active"])
            canary = s.get("canary")
            if canary and canary["version"] in s["versions"]:
                self._pending_canaries.append((s["name"], canary["version"], canary["percent"]))
        self.window = config.dedup_window
        self.horizon_s = math.ceil(config.dedup_horizon_s)  # receive times are whole seconds
        self.max_ids = config.dedup_max_ids
        self.users: dict[str, UserState] = {}
        self.dirty: set[str] = set()
        self._type_b: dict[str, bytes] = {}
        self._rules_by_script: dict[str, list[_Rule]] = {}
        self._canaries: dict[str, tuple[int, int]] = {}  # script name -> (canary version, basis points)
        self.campaigns: dict[str, _Campaign] = {c.id: self._build_campaign(c) for c in config.campaigns}
        for name, version, percent in self._pending_canaries:  # once the rules exist
            self.activate(name, version, percent)

    # -- set-up ------------------------------------------------------------------------------------
    def _build_campaign(self, c: CampaignConfig) -> _Campaign:
        budgets: dict[str, list[tuple[str, str]]] = {}
        for b in c.budgets:
            budgets.setdefault(b.action, []).append((b.name, b.param))
        budget_params = {action: sorted({param for _, param in bs}) for action, bs in budgets.items()}
        by_type: dict[str, list[_Rule]] = {}
        for rc in c.rules:
            rule = self._build_rule(c, rc, budget_params)
            by_type.setdefault(rc.on, []).append(rule)
        made = {t for rc in c.rules for t in rc.sends}
        rulesets = {
            t: _RuleSet(self.sandbox.define_ruleset([r.handle for r in rules], c.id, t), rules, len(rules), t,
                        t in made, any(r.canary_bp for r in rules))
            for t, rules in by_type.items()
        }
        clock = CampaignClock(c.timezone)
        return _Campaign(
            config=c, id=c.id, id_b=c.id.encode(), starts_ms=c.starts_ms, ends_ms=c.ends_ms,
            clock=clock, caps=CapBook(c.caps), budgets=budgets, rulesets=rulesets, offsets=clock.offsets,
        )

    def _build_rule(self, c: CampaignConfig, rc: RuleConfig, budget_params: dict[str, list[str]]) -> _Rule:
        name = rc.script_name or rc.script
        try:
            version, script = self.scripts.active(name)
        except Exception:  # noqa: BLE001 - first use of this script name: its file is version 1
            self.scripts.add(name, rc.source, 1)
            version, script = self.scripts.active(name)
        params = {t: p for t, p in budget_params.items() if t in rc.emits}
        handle = self.sandbox.define_rule(rc.id, script, list(rc.emits), params, list(rc.sends))
        rule = _Rule(rc.id, name, handle, version)
        canary = self._canaries.get(name)
        if canary is not None:  # a campaign added or replaced during a canary runs it too
            rule.canary_version, rule.canary_bp = canary
            self.sandbox.set_rule_canary(handle, self.scripts.handle(name, canary[0]), canary[1])
        self._rules_by_script.setdefault(name, []).append(rule)
        return rule

    def set_campaign(self, c: CampaignConfig) -> None:
        """Add a campaign, or replace one (its rules, caps and budgets) from the next batch on; users keep their
        contexts and cap counters (caps are counted by id), a paused campaign stays paused."""
        old = self.campaigns.get(c.id)
        if old is not None:
            stale = {id(r) for rs in old.rulesets.values() for r in rs.rules}
            for name, rules in self._rules_by_script.items():
                self._rules_by_script[name] = [r for r in rules if id(r) not in stale]
        self.campaigns[c.id] = self._build_campaign(c)
        if old is not None and old.paused:
            self.pause(c.id, True)

    def pause(self, campaign: str, paused: bool) -> bool:
        """Pause (events are applied with no rule run, as outside the campaign's window) or resume a campaign
        from the next batch; False when it is not configured here."""
        camp = self.campaigns.get(campaign)
        if camp is None:
            return False
        camp.paused = paused
        camp.ends_ms = camp.starts_ms if paused else camp.config.ends_ms  # the per-event check stays one compare
        return True

    # -- scripts (hot reload) ----------------------------------------------------------------------
    def put_script(self, name: str, source: str, version: int | None = None) -> int:
        """Store a new version of a script (compiled now, so a bad one fails here); returns its number."""
        return self.scripts.add(name, source, version)

    def activate(self, name: str, version: int, percent: float = 100) -> None:
        """Every rule using `name` runs `version` from the next batch on (a rule already running it is left
        alone: a rule disabled for failing its budget stays disabled until another version is activated).

        With `percent` below 100, a canary: only users whose canary bucket falls under `percent`% run `version`,
        the others keep the active version; activating with 100 (a version, or the old one: a rollback) ends it."""
        if percent < 100:
            bp = max(0, min(10_000, round(percent * 100)))
            handle = self.scripts.handle(name, version)
            self._canaries[name] = (version, bp)
            for rule in self._rules_by_script.get(name, ()):
                self.sandbox.set_rule_canary(rule.handle, handle if bp else 0, bp)
                rule.canary_version, rule.canary_bp = version, bp
        else:
            handle = self.scripts.activate(name, version)
            had = self._canaries.pop(name, None)
            for rule in self._rules_by_script.get(name, ()):
                if had is not None:
                    self.sandbox.set_rule_canary(rule.handle, 0, 0)
                    rule.canary_version = rule.canary_bp = 0
                if rule.version != version:
                    self.sandbox.set_rule_script(rule.handle, handle)
                    rule.version = version
        for camp in self.campaigns.values():
            for rs in (*camp.rulesets.values(), *camp.singles.values()):
                rs.canary = any(r.canary_bp for r in rs.rules)

    # -- the micro-batch ---------------------------------------------------------------------------
    def process(self, events: list[Any], now_ms: int, max_seconds: float | None = None) -> BatchOutcome:
        """Decide one micro-batch. `now_ms` is the receive time, the default `ts` of events without one.

        With `max_seconds`, rules run in chunks and, once that much time has passed, the events not reached
        yet are left undecided (`outcome.deferred` of them, at the end of `events`, untouched): slow rules delay
        the events behind them instead of failing them. Which events are deferred never changes a decision."""
        results: list[dict[str, Any]] = [None] * len(events)  # type: ignore[list-item]
        outcome = BatchOutcome(results)
        users, campaigns, window = self.users, self.campaigns, self.window
        cols: list[Any] = []
        work: list[tuple[Any, ...]] = []
        runs = 0
        add_dirty, add_work, span = self.dirty.add, work.append, _DIGEST * window
        now_s = now_ms // 1000
        stamp = (now_s & 0xFFFFFFFF).to_bytes(_STAMP, "little")
        cutoff_s, most = now_s - self.horizon_s, self.max_ids
        most_b, from_le = most * _DIGEST, int.from_bytes
        firsts: dict[tuple[str, str], dict[str, Any]] | None = None  # built at the batch's first duplicate
        deadline = time.perf_counter() + max_seconds if max_seconds is not None else None
        for idx, raw in enumerate(events):
            # The per-event loop: every line here costs on every event (attribute reads of locals, no calls
            # that could be avoided; keys.user_key and state.event_digest are inlined).
            blob: bytes | bool | None
            tp = type(raw)
            if tp is EventIn or tp is Fired or tp is Replay:
                eid, campaign, user, etype, ts, blob, depth = (raw.id, raw.campaign, raw.user, raw.type, raw.ts, None,
                                                               raw.depth)
                if ts is None:
                    ts = now_ms
            else:
                depth = 0
                ev, reason = check_event(raw, now_ms)
                if ev is None:
                    rid = raw.get("id") if type(raw) is dict else raw.id if type(raw) is Rejected else None
                    results[idx] = {"id": rid if type(rid) is str else None, "status": "rejected",
                                    "actions": [], "errors": [reason]}
                    continue
                eid, campaign, user, etype, ts, blob = ev
            camp = campaigns.get(campaign)
            if camp is None:
                results[idx] = {"id": eid, "status": "rejected", "actions": [],
                                "errors": [f"campaign: unknown campaign {campaign!r}"]}
                if tp is Fired:  # its campaign left the config: the timer can never run, remove it
                    outcome.timers.append(("del", f"{campaign}\x00{user}", eid, 0, None))
                continue
            rs = camp.rulesets.get(etype)
            if tp is Replay:
                rs = self._single(camp, raw.rule, etype)
                if rs is None or camp.paused:
                    why = "the campaign is paused" if camp.paused else f"rule {raw.rule!r} no longer runs on {etype!r}"
                    results[idx] = {"id": eid, "status": "rejected", "actions": [], "errors": [f"replay: {why}"]}
                    continue
            elif rs is not None and rs.made and not depth:
                results[idx] = {"id": eid, "status": "rejected", "actions": [], "errors": [
                    f"type: {etype!r} events are made by this campaign's rules (their sends); a gameplay cannot "
                    f"send them"]}
                continue
            key = f"{campaign}\x00{user}"  # = keys.user_key
            st = users.get(key)
            if st is None:
                st = users[key] = UserState(slot=self.sandbox.new_slot())
            if tp is Fired and not self._take_timer(st, raw, key, outcome):
                results[idx] = {"id": eid, "status": "duplicate", "actions": [], "errors": []}  # cancelled/replaced
                continue
            id_b = eid.encode()
            digest = blake2b(id_b, digest_size=8).digest()  # = state.event_digest
            seen = st.seen
            if digest in seen and st.has_seen(digest) or st.legacy and st.has_seen_legacy(eid):
                dup = results[idx] = {"id": eid, "status": "duplicate", "actions": [], "errors": []}
                if firsts is None:
                    firsts = _applied_before(events, results, idx, now_ms)
                original = firsts.get((key, eid))
                if original is not None:
                    outcome.same_batch.append((dup, original))
                else:
                    outcome.earlier.append((idx, key, eid))
                continue
            st.seen = seen + digest
            st.stamps = stamps = st.stamps + stamp
            # Past the window, forget only when there is something to forget: the oldest id received before the
            # horizon, or more ids than dedup_max_ids (a hot user's ids all within the horizon cost one compare).
            if len(seen) >= span and (len(seen) >= most_b or from_le(stamps[:_STAMP], "little") < cutoff_s):
                st.forget_old(window, cutoff_s, most)
            add_dirty(key)
            res = results[idx] = {"id": eid, "status": "applied", "actions": [], "errors": []}
            if firsts is not None:
                firsts[(key, eid)] = res
            if rs is None or not camp.starts_ms <= ts < camp.ends_ms:
                continue
            off = camp.offsets.get(ts // 900_000)
            day = (ts + off) // 86_400_000 if off is not None else camp.clock.day(ts)  # = clock.day(ts)
            if blob is None:  # an EventIn's data, as it arrived
                wire = bytes(raw.data)  # b"", b"\xc0" (nil) or b"\x80" (an empty map): no data
                blob = wire if len(wire) > 1 else False
            cols += (id_b, user.encode(), ts, day, blob, st.slot, rs.handle, depth)
            add_work((idx, eid, user, ts, st, day, camp, rs, blob, depth, raw))
            runs += rs.size
            if deadline is not None and runs >= CHUNK_RUNS:
                self._apply(work, self.sandbox.run_batch(cols, len(work), runs), outcome)
                cols, work, runs = [], [], 0
                add_work = work.append
                if time.perf_counter() > deadline and idx + 1 < len(events):
                    outcome.deferred = len(events) - idx - 1
                    del results[idx + 1:]
                    break
        if work:
            self._apply(work, self.sandbox.run_batch(cols, len(work), runs), outcome)
        for dup, original in outcome.same_batch:
            dup["actions"] = list(original["actions"])
        return outcome

    def _apply(self, work: list[Any], records: list[list[Any]], out: BatchOutcome) -> None:
        """Turn the rule runs' records into actions (through caps and budgets) and journal entries."""
        ri = 0
        add_decision = out.journal.append
        for idx, eid, user, ts, st, day, camp, rs, blob, depth, raw in work:
            cid = camp.id
            fired = _NONE if type(raw) is not Fired else [{"fired": raw.timer}]
            replay = raw.failed if type(raw) is Replay else None
            if replay is not None:
                fired = [{"replay": replay}]
            bucket = canary_bucket(cid, user) if rs.canary else 10_000  # 10,000: above every canary's share
            for rule in rs.rules:
                err, changes, emits = records[ri]
                ri += 1
                version = rule.version if bucket >= rule.canary_bp else rule.canary_version
                if err is None and emits is None:  # the common run: writes (or none), nothing proposed
                    add_decision(_new(Decision, (cid, user, eid, ts, rule.id, version, _NONE,
                                                 _NO_CHANGES if changes is None else changes, None, _NONE, fired)))
                    continue
                res = out.results[idx]
                granted: list[dict[str, Any]] = []
                refused: list[dict[str, Any]] = []
                effects: list[dict[str, Any]] = list(fired)
                if err is not None:
                    res["errors"].append(f"rule {rule.id}: {err}")
                    if replay is None:  # a replay that fails again keeps its failed-runs entry (no second one)
                        out.failed.append(self._failed_entry(eid, cid, user, rs.type, ts, blob, rule, version, err,
                                                             raw))
                else:
                    n = k = 0
                    for e in emits:
                        if type(e[0]) is not str:  # an event the rule made (send, later, cancel)
                            self._effect(e, k, camp, st, user, eid, ts, depth, rule, out, effects, refused)
                            k += 1
                            continue
                        atype, params = e
                        reason = self._admit(camp, st, atype, params, day)
                        if reason:
                            refused.append({"type": atype, "params": params, "reason": reason})
                        else:
                            granted.append({
                                "id": action_id(cid, user, eid, rule.id, n), "type": atype,
                                "campaign": cid, "user": user, "params": params, "cause": eid,
                                "rule": rule.id, "script_version": version,
                            })
                        n += 1
                    if granted:
                        res["actions"].extend(granted)
                        out.actions.extend(granted)
                add_decision(_new(Decision, (cid, user, eid, ts, rule.id, version, granted,
                                             changes if changes is not None else {}, err, refused, effects)))
            if replay is not None and records[ri - 1][0] is None:  # the one rule ran: its entry is done
                out.replayed.append((f"{cid}\x00{user}", replay))

    def _single(self, camp: _Campaign, rule_id: str, etype: str) -> _RuleSet | None:
        """A rule set of one rule of the campaign (a replay runs only the rule that failed), or None when the
        campaign has no such rule on `etype`."""
        key = (rule_id, etype)
        rs = camp.singles.get(key)
        if rs is None:
            full = camp.rulesets.get(etype)
            rule = next((r for r in full.rules if r.id == rule_id), None) if full is not None else None
            if rule is None:
                return None
            rs = camp.singles[key] = _RuleSet(self.sandbox.define_ruleset([rule.handle], camp.id, etype), [rule], 1,
                                              etype, full.made if full else False, rule.canary_bp > 0)
        return rs

    # -- events rules make: sends and timers -------------------------------------------------------
    @staticmethod
    def _take_timer(st: UserState, fired: Fired, key: str, out: BatchOutcome) -> bool:
        """A due timer arrives: True (and the timer is removed) when the user still holds it; False when it was
        replaced or cancelled since it was read (its entry is removed all the same)."""
        timers = st.timers
        t = timers.get(fired.timer) if timers else None
        out.timers.append(("del", key, fired.id, 0, None))
        if t is None or t[0] != fired.id:
            return False
        assert timers is not None
        del timers[fired.timer]
        if not timers:
            st.timers = None
        out.counts["fired"] = out.counts.get("fired", 0) + 1
        return True

    def _effect(self, e: list[Any], k: int, camp: _Campaign, st: UserState, user: str, eid: str, ts: int, depth: int,
                rule: _Rule, out: BatchOutcome, effects: list[dict[str, Any]], refused: list[dict[str, Any]]) -> None:
        """Turn one event a rule run made (its `k`-th) into a send or a timer change (see Sandbox.run_batch)."""
        kind = e[0]
        cid = camp.id
        counts = out.counts
        if kind == 3:  # cancel(key)
            name = e[1]
            old = st.timers.pop(name, None) if st.timers else None
            if old is not None:
                out.timers.append(("del", user_key(cid, user), old[0], 0, None))
                counts["timers_cancelled"] = counts.get("timers_cancelled", 0) + 1
                if not st.timers:
                    st.timers = None
            effects.append({"cancel": name, "id": old[0] if old is not None else None})
            return
        etype, data = e[1], e[2]
        wire = msgspec.Raw(_pack_data(data)) if data else NO_DATA  # NO_DATA itself: encoding omits it
        if kind == 1:  # send(user, type, data)
            target = e[3]
            sid = derived_event_id("s", cid, user, eid, rule.id, k)
            out.sends.append((user_key(cid, user), EventIn(sid, cid, target, etype, ts, wire, eid, depth + 1)))
            counts["sent"] = counts.get("sent", 0) + 1
            effects.append({"send": target, "type": etype, "id": sid})
            return
        delay, key = e[3], e[4]  # later(delay_ms, type, data [, key])
        tid = derived_event_id("t", cid, user, eid, rule.id, k)
        name = key or tid
        due = min(ts + delay, MAX_TS - 1)
        timers = st.timers
        if timers is None:
            timers = st.timers = {}
        old = timers.get(name)
        if old is None and len(timers) >= MAX_PENDING_TIMERS:
            refused.append({"type": etype, "params": {"timer": name},
                            "reason": f"timers: the user has {MAX_PENDING_TIMERS} timers pending"})
            return
        ukey = user_key(cid, user)
        if old is not None:
            out.timers.append(("del", ukey, old[0], 0, None))
        timers[name] = (tid, due, etype)
        out.timers.append(("set", ukey, tid, due, Fired(tid, cid, user, etype, due, wire, eid, depth + 1,
                                                                  name)))
        counts["timers_set"] = counts.get("timers_set", 0) + 1
        effects.append({"later": name, "type": etype, "id": tid, "due": due})

    @staticmethod
    def _failed_entry(eid: str, campaign: str, user: str, etype: str, ts: int, blob: bytes | bool, rule: _Rule,
                      version: int, err: str, raw: Any = None) -> dict[str, Any]:
        event: dict[str, Any] = {"id": eid, "campaign": campaign, "user": user, "type": etype, "ts": ts}
        if blob:
            event["data"] = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        if type(raw) is EventIn or type(raw) is Fired or type(raw) is Replay:
            if raw.depth:
                event["cause"], event["depth"] = raw.cause, raw.depth
        return {"event": event, "rule": rule.id, "script_version": version, "error": err}

    def _admit(self, camp: _Campaign, st: UserState, atype: str, params: dict[str, Any], day: int) -> str:
        """"" when caps and budgets allow this action (and it is counted), else the reason."""
        caps = camp.caps
        capped = atype in caps.by_action
        if capped:
            reason = caps.refusal(st.caps, atype, day)
            if reason:
                return reason
        budgets = camp.budgets.get(atype)
        if budgets is not None:
            short = self.budgets.try_spend(camp.config.id, [(name, params[param]) for name, param in budgets])
            if short:
                param = next(p for n, p in budgets if n == short)
                return f"budget:{short}: cannot cover {param}={params[param]}"
        if capped:
            if st.caps is None:
                st.caps = {}
            caps.count(st.caps, atype, day)
        return ""

    # -- state -------------------------------------------------------------------------------------
    def missing(self, events: list[Any]) -> list[str]:
        """Keys of the users these events touch that are not in memory (to load before `process`)."""
        users, out, seen = self.users, [], set()
        for key in user_keys(events):
            if key not in users and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def start_users(self, events: list[Any], context: dict[str, Any] | bytes) -> None:
        """Give every user these events touch who is not in memory yet this starting context (dry runs)."""
        for key in self.missing(events):
            self.restore(key, None)
            self.sandbox.load_context(self.users[key].slot, context)

    def take_dirty(self) -> set[str]:
        """The users changed since the last call (and forget them)."""
        d, self.dirty = self.dirty, set()
        return d

    def snapshot(self, keys: list[str] | set[str] | None = None) -> dict[str, bytes]:
        """msgpack bytes of each user's whole state (default: the dirty users, which are then clean)."""
        if keys is None:
            keys = self.take_dirty()
        users = self.users
        states = [(k, users[k]) for k in keys if k in users]
        blobs = self.sandbox.get_context_blobs([st.slot for _, st in states])
        return {k: encode_snapshot(st, b) for (k, st), b in zip(states, blobs, strict=False)}

    def restore(self, key: str, blob: bytes | None) -> None:
        """Load a user's state from a snapshot (None: a new user with empty state)."""
        old = self.users.get(key)
        if old is not None:
            self.sandbox.free_slot(old.slot)
        if blob is None:
            self.users[key] = UserState(slot=self.sandbox.new_slot())
            return
        state, context = decode_snapshot(blob)
        if state.caps and any(type(k) is int for k in state.caps):  # a version 1 snapshot: caps by position
            camp = self.campaigns.get(key.partition("\x00")[0])
            state.caps = camp.caps.migrate(state.caps) if camp is not None else None
        state.slot = self.sandbox.new_slot()
        if context is not None:
            self.sandbox.load_context(state.slot, context)
        self.users[key] = state

    def evict(self, key: str) -> None:
        """Forget a user's in-memory state (it must have been snapshotted first)."""
        st = self.users.pop(key, None)
        self.dirty.discard(key)
        if st is not None:
            self.sandbox.free_slot(st.slot)

    def context(self, campaign: str, user: str) -> dict[str, Any]:
        """The user's context as plain data ({} when unknown)."""
        return self.contexts([user_key(campaign, user)])[0]

    def timers(self, campaign: str, user: str) -> list[dict[str, Any]]:
        """The user's pending timers, soonest first (see state.pending_timers); [] when unknown."""
        st = self.users.get(user_key(campaign, user))
        return pending_timers(st) if st is not None else []

    def contexts(self, keys: list[str]) -> list[dict[str, Any]]:
        users = self.users
        slots = [st.slot if (st := users.get(k)) is not None else 0 for k in keys]
        return [c or {} for c in self.sandbox.get_contexts(slots)]
