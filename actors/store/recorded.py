"""Recorded events: what each journal entry's rule runs decided on, kept beside them for backtests.

Each key group's journal entry (one per committed batch, see store.commit) holds field "d", the batch's rule runs
of that group, and field "e", the events those runs decided: a msgpack array of EventIn (id, campaign, user, type,
ts, data, cause, depth; its `ts` the time the engine decided with, its data as it arrived). Only events whose rules
ran are recorded: an event that ran no rule (no rule on its type, outside the campaign's window, paused, a
duplicate, rejected) runs none under any script version either, and has no journal entry to go with. A due timer
is recorded as the event it carries (without the timer's name), a replayed failed run not at all (its event was
recorded when it first ran). Entries written before recording began have no "e": they are skipped.

`read_recorded` reads the newest entries of every group back (newest first across groups, by entry id) until it
has a campaign's last N events, and returns them in time order. For a backtest starting from the contexts the
users had before those events, it also gathers what the events' runs wrote (context keys, grants counted by
caps) and, reading on into older entries, the value each written key had before; `starting_states` rewinds the
users' current snapshots with them.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import msgspec
import redis

from playbus.actors.engine.caps import CapBook
from playbus.actors.engine.clock import CampaignClock
from playbus.actors.engine.errors import StateError
from playbus.actors.engine.events import NO_DATA, EventIn, Fired, check_event
from playbus.actors.engine.keys import group_prefix, key_group, user_key
from playbus.actors.engine.state import decode_snapshot
from playbus.config.schema import Config

__all__ = ["REWIND_SCAN", "Recorded", "ran_rules", "read_recorded", "recorded_events", "starting_states"]

PAGE = 200  # journal entries read in one XREVRANGE
REWIND_SCAN = 1_000_000  # rule runs read past the window at most, looking for the values keys had before it
Progress = Callable[[int, int], None]

_dec_events = msgspec.msgpack.Decoder(list[EventIn]).decode
_dec_any = msgspec.msgpack.Decoder().decode
_ABSENT = object()


def ran_rules(events: list[Any], journal: Iterable[Any]) -> list[tuple[str, EventIn]]:
    """(user key, event) of the events of a decided batch whose rules ran (they have rule runs in `journal`, the
    batch's Decision entries): what RedisStore.commit records as `recorded`. Each event once, in batch order, as
    an EventIn with the time the engine decided it at; a timer as the event it carries; replays left out (an
    event of another type than EventIn, Fired or a plain dict)."""
    ts_of: dict[tuple[str, str, str], int] = {}
    first = ts_of.setdefault
    for campaign, user, eid, ts, *_ in journal:  # Decision fields (unpacked: its __getitem__ is Python's)
        first((campaign, user, eid), ts)
    if not ts_of:
        return []
    out: list[tuple[str, EventIn]] = []
    pop = ts_of.pop
    for raw in events:
        tp = type(raw)
        if tp is EventIn or tp is Fired:
            ts = pop((raw.campaign, raw.user, raw.id), None)
            if ts is None:
                continue
            if tp is Fired or raw.ts != ts or (not len(raw.data) and raw.data is not NO_DATA):
                raw = EventIn(raw.id, raw.campaign, raw.user, raw.type, ts, raw.data if len(raw.data) else NO_DATA,
                              raw.cause, raw.depth)
            out.append((f"{raw.campaign}\x00{raw.user}", raw))
        elif tp is dict:
            ev, _ = check_event(raw, 0)
            if ev is None:
                continue
            ts = pop((ev.campaign, ev.user, ev.id), None)
            if ts is None:
                continue
            data = msgspec.Raw(ev.blob) if isinstance(ev.blob, bytes) else NO_DATA
            out.append((f"{ev.campaign}\x00{ev.user}", EventIn(ev.id, ev.campaign, ev.user, ev.type, ts, data)))
    return out


@dataclass
class Recorded:
    """A campaign's last recorded events (time order) and, with `rewind`, what their runs changed: per user key,
    the context keys written (`written`), the value of each before the window (`before`; None: the key was
    deleted; a key written in the window and not found before it is taken as absent, counted in `assumed`), and
    the grants (action type, event time) the caps counted (`grants`)."""

    events: list[EventIn]
    written: dict[str, set[str]] = field(default_factory=dict)
    before: dict[str, dict[str, Any]] = field(default_factory=dict)
    grants: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    entries: int = 0  # journal entries read
    assumed: int = 0  # (user, key) pairs written in the window whose earlier value the journal may no longer hold
    complete: bool = True  # False when the scan for earlier values stopped at REWIND_SCAN rule runs


def _entry_id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq or 0)


def _decision(d: Any) -> tuple[str, str, str, int, Any, Any]:
    """(campaign, user, event id, ts, actions, changes) of a packed journal decision (an array, or a map from
    older commits)."""
    if isinstance(d, dict):
        return d["campaign"], d["user"], d["event"], d.get("ts") or 0, d.get("actions") or (), d.get("changes") or {}
    return d[0], d[1], d[2], d[3], d[6] or (), d[7] or {}


def recorded_events(client: redis.Redis, key_groups: int, campaign: str | Collection[str], last: int,
                    progress: Progress | None = None) -> list[EventIn]:
    """The campaign's last `last` events recorded in the journals (fewer when the journals hold fewer), in time
    order (by ts, then journal order). Read only. `progress(found, last)` is called as they are found."""
    return read_recorded(client, key_groups, campaign, last, progress, rewind=False).events


def read_recorded(client: redis.Redis, key_groups: int, campaign: str | Collection[str], last: int,
                  progress: Progress | None = None, rewind: bool = True, rewind_scan: int = REWIND_SCAN,
                  page: int = PAGE) -> Recorded:
    """The last `last` events of `campaign` (one id, or several) from every group's journal, newest entries first
    across groups (entry ids are Redis times, comparable across groups), in pages of `page` entries; returned in
    time order. With `rewind`, also what the runs of those events wrote and, from older entries (at most
    `rewind_scan` rule runs past the window), the values written keys had before (see Recorded). Read only
    (XREVRANGE, and XINFO STREAM of the journals read to their start)."""
    camps = {campaign} if isinstance(campaign, str) else set(campaign)
    needles = [c.encode() for c in camps]
    keys = [group_prefix(kg) + "journal" for kg in range(key_groups)]
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.xrevrange(k, count=page)
    pages: list[list[Any]] = list(pipe.execute())
    cursor = [0] * key_groups
    heap: list[tuple[int, int, int]] = []  # (-ms, -seq, group): the newest unread entry of each group on top
    for kg, pg in enumerate(pages):
        if pg:
            ms, seq = _entry_id(pg[0][0])
            heap.append((-ms, -seq, kg))
    heapq.heapify(heap)
    found: list[tuple[int, int, int, int, EventIn]] = []  # (ts, ms, seq, position, event), newest entries first
    window: set[tuple[str, str, str]] = set()
    rec = Recorded([])
    pending: dict[str, set[str]] = {}  # user key -> keys written in the window whose earlier value is not found yet
    pending_groups: dict[int, int] = {}  # group -> users with pending keys (after the window is complete)
    past = 0  # rule runs read past the window
    reported = 0
    while heap:
        full = len(found) >= last
        if full and (not rewind or not pending):
            break
        _, _, kg = heapq.heappop(heap)
        if full and not pending_groups.get(kg):
            continue  # nothing of this group is pending: its older entries are not needed
        pg, i = pages[kg], cursor[kg]
        raw_id, fields = pg[i]
        if i + 1 < len(pg):
            cursor[kg] = i + 1
            ms, seq = _entry_id(pg[i + 1][0])
            heapq.heappush(heap, (-ms, -seq, kg))
        elif len(pg) == page:
            # XREVRANGE's end is inclusive: "(" + id starts right after the oldest entry read
            more: Any = client.xrevrange(keys[kg], max=b"(" + raw_id, count=page)
            if more:
                pages[kg], cursor[kg] = more, 0
                ms, seq = _entry_id(more[0][0])
                heapq.heappush(heap, (-ms, -seq, kg))
        rec.entries += 1
        ms, seq = _entry_id(raw_id)
        took = 0
        if not full:
            blob = fields.get(b"e")
            if blob and any(n in blob for n in needles):
                mine = [e for e in _dec_events(blob) if e.campaign in camps]
                need = last - len(found)
                start = max(0, len(mine) - need)  # the newest of the entry: its last ones
                for pos in range(len(mine) - 1, start - 1, -1):
                    e = mine[pos]
                    found.append((e.ts or 0, ms, seq, pos, e))
                    window.add((e.campaign, e.user, e.id))
                took = len(mine) - start
            if progress is not None and len(found) - reported >= 1000:
                reported = len(found)
                progress(len(found), last)
        elif past > rewind_scan:
            rec.complete = False
            break
        if rewind and (took or pending) and b"d" in fields and any(n in fields[b"d"] for n in needles):
            decisions = _dec_any(fields[b"d"])
            if full:
                past += len(decisions)
            for uk in _rewind_entry(decisions, camps, window, rec, pending):
                del pending[uk]
                if full:
                    pending_groups[key_group(uk, key_groups)] -= 1
        if rewind and not full and len(found) >= last:  # the window is complete: which groups still matter
            for uk in pending:
                g = key_group(uk, key_groups)
                pending_groups[g] = pending_groups.get(g, 0) + 1
    if progress is not None:
        progress(len(found), last)
    if pending:
        rec.assumed = _assumed(client, keys, key_groups, pending, rec.complete)
    found.sort(key=lambda t: t[:4])
    rec.events = [t[4] for t in found]
    return rec


def _assumed(client: redis.Redis, keys: list[str], key_groups: int, pending: dict[str, set[str]],
             complete: bool) -> int:
    """How many of the keys still pending were assumed absent before the window: all of them when the scan
    stopped early; else those of groups whose journal lost entries (trimmed: entries-added exceeds its length).
    A journal read back to its very first entry proves a key it never shows written was absent."""
    if not complete:
        return sum(len(ks) for ks in pending.values())
    by_group: dict[int, int] = {}
    for uk, ks in pending.items():
        g = key_group(uk, key_groups)
        by_group[g] = by_group.get(g, 0) + len(ks)
    pipe = client.pipeline(transaction=False)
    for g in by_group:
        pipe.xinfo_stream(keys[g])
    n = 0
    for count, info in zip(by_group.values(), pipe.execute(raise_on_error=False), strict=True):
        if isinstance(info, Exception) or not isinstance(info, dict) or \
                int(info.get("entries-added", -1)) != int(info.get("length", 0)):
            n += count
    return n


def _rewind_entry(decisions: list[Any], camps: set[str], window: set[tuple[str, str, str]], rec: Recorded,
                  pending: dict[str, set[str]]) -> list[str]:
    """One journal entry's decisions, newest first: a run of a window event adds the keys it wrote (and its
    grants); a run of an older event gives the value of a pending key before the window (the newest one wins).
    The users whose last pending key this entry resolved."""
    done: list[str] = []
    for d in reversed(decisions):
        c, u, eid, ts, actions, changes = _decision(d)
        if c not in camps:
            continue
        uk = user_key(c, u)
        if (c, u, eid) in window:
            if changes:
                rec.written.setdefault(uk, set()).update(changes)
                pending.setdefault(uk, set()).update(changes)
            if actions:
                rec.grants.setdefault(uk, []).extend((a["type"], ts) for a in actions)
            continue
        p2 = pending.get(uk)
        if not p2 or not changes:
            continue
        for k, v in changes.items():
            if k in p2:
                rec.before.setdefault(uk, {})[k] = v
                p2.discard(k)
        if not p2:
            done.append(uk)
    return done


def starting_states(rec: Recorded | None, snapshots: Mapping[str, bytes | None], config: Config
                    ) -> tuple[dict[str, Any], dict[str, dict[str, dict[int, int]]], int]:
    """(contexts, cap counters, unreadable) to start a backtest from: each user's committed context and cap
    counters, rewound to before the window when `rec` says what its runs changed (keys written in it set back to
    their earlier value or removed, its grants uncounted). A context unchanged is passed on as the snapshot's
    msgpack bytes; `unreadable`: snapshots that could not be decoded (those users start empty)."""
    camps = {c.id: c for c in config.campaigns}
    books: dict[str, tuple[CapBook, CampaignClock]] = {}
    contexts: dict[str, Any] = {}
    caps: dict[str, dict[str, dict[int, int]]] = {}
    bad = 0
    for uk, blob in snapshots.items():
        if blob is None:
            state_caps: dict[Any, dict[int, int]] | None = None
            ctx: bytes | None = None
        else:
            try:
                state, ctx = decode_snapshot(blob)
            except StateError:
                bad += 1
                continue
            state_caps = state.caps
        written = rec.written.get(uk) if rec is not None else None
        if written:
            before = rec.before.get(uk, {}) if rec is not None else {}
            c: dict[str, Any] = msgpack.unpackb(ctx, raw=False, strict_map_key=False) if ctx else {}
            if not isinstance(c, dict):
                c = {}
            for k in written:
                v = before.get(k, _ABSENT)
                if v is _ABSENT or v is None:
                    c.pop(k, None)
                else:
                    c[k] = v
            contexts[uk] = c
        elif ctx:
            contexts[uk] = ctx
        counters = {str(k): dict(v) for k, v in state_caps.items() if isinstance(k, str)} if state_caps else {}
        grants = rec.grants.get(uk) if rec is not None else None
        if grants and counters:
            campaign = uk.partition("\x00")[0]
            camp = camps.get(campaign)
            if camp is not None:
                got = books.get(campaign)
                if got is None:
                    got = books[campaign] = (CapBook(camp.caps), CampaignClock(camp.timezone))
                _uncount(counters, grants, *got)
        if counters:
            caps[uk] = counters
    return contexts, caps, bad


def _uncount(counters: dict[str, dict[int, int]], grants: list[tuple[str, int]], book: CapBook,
             clock: CampaignClock) -> None:
    """Take grants back out of a user's cap counters (each counted against every cap on its type)."""
    for atype, ts in grants:
        for key, cap in book.by_action.get(atype, ()):
            periods = counters.get(key)
            if not periods:
                continue
            day = clock.day(ts)
            period = day if cap.period == "day" else (day + 3) // 7 if cap.period == "week" else 0  # = CapBook._period
            n = periods.get(period, 0)
            if n > 1:
                periods[period] = n - 1
            elif n == 1:
                del periods[period]
                if not periods:
                    del counters[key]
