"""Backtest: a script's active version against a candidate, on the same events from the same starting states.

Two private engines (each its own sandbox and in-memory budgets: nothing leaves them) decide the events in
batches of BATCH through `ShardEngine.process`, one batch in one then the same batch in the other, and the two
outcomes are compared event by event. Every other script runs its active version in both. An event is `changed`
when the grants of its rule runs differ, compared by (rule, action type, params) as a multiset.

Both engines start every user the events reach from the same state: the context given (else empty), the cap
counters given (else none), no dedup memory, no pending timer; budgets start at their configured totals. The
events that rules make (sends, timers) are not followed: a recorded window already holds the ones the active
version made (replayed in both, as recorded); what each version made is compared as its runs' effects
(`effects_changed`), not decided.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from playbus.actors.engine.budgets import LocalBudgets
from playbus.actors.engine.engine import BatchOutcome, ShardEngine
from playbus.actors.engine.events import EventIn, Fired, check_event
from playbus.config.schema import Config

__all__ = ["BATCH", "EXAMPLES", "backtest", "script_listing"]

BATCH = 500  # events per engine.process call: the fastest size measured
EXAMPLES = 20  # changed events shown
CAP_EXAMPLES = 10  # users shown who would hit a cap
Progress = Callable[[int, int], None]
_get = tuple.__getitem__  # a Decision's field by position (its own __getitem__, by name too, is Python's)


def script_listing(config: Config, name: str, listing: Sequence[Mapping[str, Any]], version: int, source: str
                   ) -> list[dict[str, Any]]:
    """The scripts an engine starts from: every other script of `listing` (the catalog's) at its active version
    only, and `name` at `version` with `source`."""
    out: list[dict[str, Any]] = [{"name": s["name"], "active": s["active"],
                                  "versions": {s["active"]: s["versions"][s["active"]]}}
                                 for s in listing if s["name"] != name and s["active"]]
    out.append({"name": name, "active": version, "versions": {version: source}})
    return out


def _active(config: Config, name: str, listing: Sequence[Mapping[str, Any]]) -> tuple[int, str]:
    """(version, source) of the script's active version: the catalog's, else its file's as version 1."""
    for s in listing:
        if s["name"] == name and s["active"]:
            return int(s["active"]), str(s["versions"][s["active"]])
    for c in config.campaigns:
        for r in c.rules:
            if r.script_name == name:
                return 1, r.source
    raise ValueError(f"no script named {name!r}")


def backtest(config: Config, name: str, candidate_source: str, candidate_version: int,
             scripts_listing: Sequence[Mapping[str, Any]], events: Sequence[Any],
             contexts: Mapping[str, Any] | None = None, progress: Progress | None = None, *,
             caps: Mapping[str, dict[str, dict[int, int]]] | None = None, now_ms: int | None = None,
             batch: int = BATCH) -> dict[str, Any]:
    """Decide `events` (EventIn or dicts) with script `name` at its active version and at the candidate
    (`candidate_source`, numbered `candidate_version`: 0 for an unsaved source) and compare (see the module).

    `contexts`: user key -> starting context (msgpack bytes of a map, or a dict); `caps`: user key -> starting cap
    counters ({cap key: {period: n}}); users not given start empty. `progress(done, total)` after every batch.
    Raises ScriptError when a version does not compile."""
    started = time.perf_counter()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    active_version, active_source = _active(config, name, scripts_listing)
    engines = []
    for v, src in ((active_version, active_source), (candidate_version, candidate_source)):
        engines.append(ShardEngine(config, LocalBudgets(config),
                                   scripts=script_listing(config, name, scripts_listing, v, src)))
    a_eng, b_eng = engines
    budgets_start = dict(LocalBudgets(config).remaining)
    contexts = contexts or {}
    caps = caps or {}
    cmp = _Comparison()
    total = len(events)
    collecting = gc.isenabled()
    gc.disable()  # the cyclic collector would walk the runs' many live objects over and over: 2 to 4 times slower
    try:
        _run(engines, events, contexts, caps, cmp, now, batch, progress)
    finally:
        if collecting:
            gc.enable()
    spend: dict[str, dict[str, dict[str, int]]] = {}
    deltas: dict[str, int] = {}
    a_left, b_left = a_eng.budgets, b_eng.budgets
    assert isinstance(a_left, LocalBudgets) and isinstance(b_left, LocalBudgets)
    for (campaign, bname), start in sorted(budgets_start.items()):
        sa = start - a_left.remaining.get((campaign, bname), start)
        sb = start - b_left.remaining.get((campaign, bname), start)
        if sa or sb:
            spend.setdefault(campaign, {})[bname] = {"active": sa, "candidate": sb}
            deltas[bname] = deltas.get(bname, 0) + sb - sa
    hit_b = {k: v for k, v in cmp.capped[1].items() if k not in cmp.capped[0]}
    released = [k for k in cmp.capped[0] if k not in cmp.capped[1]]
    return {
        "script": name,
        "active": {"version": active_version},
        "candidate": {"version": candidate_version},
        "events": total,
        "users": len(a_eng.users),
        "changed": cmp.changed,
        "rejected": cmp.rejected,
        "grants": {"added": dict(sorted(cmp.added.items())), "removed": dict(sorted(cmp.removed.items())),
                   "active": dict(sorted(cmp.grants[0].items())), "candidate": dict(sorted(cmp.grants[1].items()))},
        "budgets": deltas,
        "spend": spend,
        "caps": {"users": len(hit_b), "released": len(released),
                 "examples": [{"campaign": k.partition("\x00")[0], "user": k.partition("\x00")[2],
                               "caps": sorted(v)} for k, v in list(hit_b.items())[:CAP_EXAMPLES]]},
        "refusals": {r: {"active": cmp.refusals[0].get(r, 0), "candidate": cmp.refusals[1].get(r, 0)}
                     for r in sorted(set(cmp.refusals[0]) | set(cmp.refusals[1]))},
        "errors": {"active": cmp.errors[0], "candidate": cmp.errors[1]},
        "effects_changed": cmp.effects_changed,
        "examples": cmp.examples,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _run(engines: list[ShardEngine], events: Sequence[Any], contexts: Mapping[str, Any],
         caps: Mapping[str, dict[str, dict[int, int]]], cmp: _Comparison, now: int, batch: int,
         progress: Progress | None) -> None:
    """Decide the events batch by batch in both engines, each user started as given, and compare."""
    total = len(events)
    for i in range(0, total, batch):
        chunk = list(events[i:i + batch])
        outs = []
        for eng in engines:
            for key in eng.missing(chunk):
                eng.restore(key, None)
                st = eng.users[key]
                ctx = contexts.get(key)
                if ctx:
                    eng.sandbox.load_context(st.slot, ctx)
                counters = caps.get(key)
                if counters:
                    st.caps = copy.deepcopy(counters)
            outs.append(eng.process(chunk, now))
            eng.take_dirty()
        cmp.add(chunk, outs[0], outs[1], now)
        if progress is not None:
            progress(min(i + batch, total), total)


class _Comparison:
    """The running comparison of the two engines' outcomes, batch by batch."""

    def __init__(self) -> None:
        self.changed = 0
        self.rejected = 0
        self.effects_changed = 0
        self.added: dict[str, int] = {}
        self.removed: dict[str, int] = {}
        self.grants: tuple[dict[str, int], dict[str, int]] = ({}, {})
        self.refusals: tuple[dict[str, int], dict[str, int]] = ({}, {})
        self.errors = [0, 0]
        self.capped: tuple[dict[str, set[str]], dict[str, set[str]]] = ({}, {})  # user key -> cap ids that refused
        self.examples: list[dict[str, Any]] = []

    def add(self, events: list[Any], a: BatchOutcome, b: BatchOutcome, now_ms: int) -> None:
        effects: list[dict[tuple[str, str, str], list[Any]]] = [{}, {}]
        for side, out in enumerate((a, b)):
            refusals, capped, eff = self.refusals[side], self.capped[side], effects[side]
            for d in out.journal:
                err, refused, made = _get(d, 8), _get(d, 9), _get(d, 10)  # error, refused, effects
                if err is not None:
                    self.errors[side] += 1
                if refused:
                    for r in refused:
                        kind = r["reason"].partition(": ")[0]
                        refusals[kind] = refusals.get(kind, 0) + 1
                        if kind.startswith("cap:"):
                            capped.setdefault(f"{_get(d, 0)}\x00{_get(d, 1)}", set()).add(kind[4:])
                if made:
                    eff.setdefault((_get(d, 0), _get(d, 1), _get(d, 2)), []).extend(made)
        if effects[0] != effects[1]:
            self.effects_changed += sum(1 for k in effects[0].keys() | effects[1].keys()
                                        if effects[0].get(k) != effects[1].get(k))
        ga, gb = self.grants
        for idx, (ra, rb) in enumerate(zip(a.results, b.results, strict=True)):
            if ra["status"] != "applied":
                if ra["status"] == "rejected":
                    self.rejected += 1
                continue
            acts_a, acts_b = ra["actions"], rb["actions"]
            for acts, counts in ((acts_a, ga), (acts_b, gb)):
                for x in acts:
                    counts[x["type"]] = counts.get(x["type"], 0) + 1
            if not acts_a and not acts_b:
                continue
            ka = [(x["rule"], x["type"], x["params"]) for x in acts_a]
            kb = [(x["rule"], x["type"], x["params"]) for x in acts_b]
            if ka == kb:
                continue
            removed = list(ka)
            added = []
            for k in kb:
                if k in removed:
                    removed.remove(k)
                else:
                    added.append(k)
            if not added and not removed:  # the same grants in another order
                continue
            self.changed += 1
            for k in added:
                self.added[k[1]] = self.added.get(k[1], 0) + 1
            for k in removed:
                self.removed[k[1]] = self.removed.get(k[1], 0) + 1
            if len(self.examples) < EXAMPLES:
                self.examples.append({"event": _event_doc(events[idx], now_ms),
                                      "active": [_action_doc(x) for x in acts_a],
                                      "candidate": [_action_doc(x) for x in acts_b]})


def _action_doc(a: Mapping[str, Any]) -> dict[str, Any]:
    return {"rule": a["rule"], "type": a["type"], "params": a["params"], "script_version": a["script_version"]}


def _event_doc(raw: Any, now_ms: int) -> dict[str, Any]:
    """An event as the API shows it (its data decoded)."""
    ev, _ = check_event(raw, now_ms)
    if ev is None:
        return {"id": raw.get("id") if isinstance(raw, dict) else None}
    doc: dict[str, Any] = {"id": ev.id, "campaign": ev.campaign, "user": ev.user, "type": ev.type, "ts": ev.ts}
    if ev.blob:
        doc["data"] = msgpack.unpackb(ev.blob, raw=False, strict_map_key=False)
    if (type(raw) is EventIn or type(raw) is Fired) and raw.depth:
        doc["cause"], doc["depth"] = raw.cause, raw.depth
    return doc
