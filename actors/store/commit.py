"""RedisStore: the shard's durable side. One atomic, epoch-fenced Lua unit per key group and micro-batch.

Key layout (the key group's hash tag keeps every key of a group in one Redis Cluster slot):
    playbus:{kg17}:epoch     string  owner epoch (fencing token), INCR by each new owner
    playbus:{kg17}:batch     string  token of the group's last commit (a re-sent commit is a no-op)
    playbus:{kg17}:users     hash    user_key -> snapshot (msgpack bytes, see actors.engine.state)
    playbus:{kg17}:journal   stream  one entry per committed batch: field "d" = msgpack array of its decisions
                                     (rule runs, see actors.engine.decisions), and "e" = msgpack array of the
                                     events those runs decided (EventIn, see store.recorded; absent in entries
                                     written before it was recorded), trimmed to about `journal_maxlen`
    playbus:{kg17}:in        stream  the group's input partition: field "events" = msgpack array of events
                                     (a record batch), or "event" = one event (JSON or msgpack)
    playbus:{kg17}:offset    string  the last entry of the input partition that a committed batch consumed
    playbus:{kg17}:timers    zset    pending timers of the group's users: event id, scored by due time (ms)
    playbus:{kg17}:timer_events hash event id -> the timer's event (msgpack, actors.engine.events.Fired)
    playbus:{kg17}:stats     hash    counters of the group's committed rule runs, per campaign (see `stat_counts`):
                                     "<campaign>\0runs\0<rule>\0<version>", "...\0errors\0<rule>\0<version>",
                                     "...\0grants\0<action type>", "...\0refusals\0cap:<id>|budget:<name>|..."
    playbus:{kg17}:outbox    stream  field "action" = action JSON, for the delivery worker
    playbus:{kg17}:failed    stream  field "entry" = failed rule run JSON, for replay (补单)
Events that rules `send` are XADDed to the target user's input partition (field "events", one record batch per
target group) inside the sender's unit, and a timer set, replaced, cancelled or fired changes its group's
`timers` and `timer_events` in the unit that decided it: both are exactly once with the state. Actions of a
stream target are XADDed to the target stream (field "action") inside the group's unit, and invalid input events
to `playbus:rejected`: exactly once with the state.

On a Redis Cluster (a cluster client, see store.connect) a script call may only touch keys of one slot, and every
key of a group shares its slot (the hash tag), so each group's unit is its own call (one pipeline, split by node),
and what lives in other slots goes through the group's outbox, written in the unit, and is forwarded by the
delivery worker (service.delivery, store.outbox.Outbox.forward): at least once, in outbox order, the same bytes.
    outbox field "action"    an action of a stream target (as any webhook action; forwarded to its stream)
    outbox field "send"      msgpack [target group, record batch]: events rules sent to users of another group,
                             forwarded to that group's input partition (a send within the group stays in the unit)
    outbox field "rejected"  a `playbus:rejected` record, forwarded there
A forwarded send that lands twice (the deliverer crashed between the XADD and its XACK) carries the same event id
both times, and the target user's dedup answers the second `duplicate`: sends stay exactly once in effect, and in
order from one sender group to one target group (the outbox is forwarded in order, and re-read from the oldest
pending entry after a failure). Stream-target actions and rejection records are at least once, like webhooks.
The commit's durability on a cluster is each node's own AOF policy (WAITAOF is not used: see store.durability).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, cast

import msgspec
import redis
from hiredis import pack_command
from redis.exceptions import NoScriptError

from playbus.actors.engine.decisions import Decision
from playbus.actors.engine.events import EventIn, Fired, encode_events
from playbus.actors.engine.keys import group_prefix, key_group, user_key
from playbus.actors.store.connect import is_cluster_client
from playbus.actors.store.errors import FencedError, StoreError
from playbus.actors.store.scripts import lua
from playbus.actors.store.slots import Cmd, execute, load_scripts

__all__ = ["REJECTED_STREAM", "FencedError", "RedisStore", "StoreError", "stat_counts"]

REJECTED_STREAM = "playbus:rejected"
JOURNAL_SCAN = 2000  # journal entries (batches) of a group scanned back when looking for a user's decisions
JOURNAL_PAGE = 200  # journal entries read in one XREVRANGE

_dumps = msgspec.json.Encoder().encode  # actions and failed runs as compact JSON (bytes)
_pack = msgspec.msgpack.Encoder().encode  # journal entries: Decision tuples pack as arrays
_unpack = msgspec.msgpack.Decoder().decode


def _collect(decisions: list[Any], found: dict[str, list[dict[str, Any]]]) -> None:
    """Put the decisions of one journal entry (a batch) that belong to the users of `found` before what was found
    so far (the entry is older), as dicts; the others are skipped before any dict is built."""
    newer: dict[str, list[dict[str, Any]]] = {}
    for d in decisions:
        campaign, user = (d["campaign"], d["user"]) if isinstance(d, dict) else (d[0], d[1])
        uk = user_key(campaign, user)
        if uk in found:
            newer.setdefault(uk, []).append(Decision.from_packed(d))
    for uk, rows in newer.items():
        found[uk][:0] = rows


def stat_counts(decisions: Iterable[Any]) -> dict[str, int]:
    """The counters a group's share of a batch adds to its `stats` hash: per campaign, rule runs and failed runs
    by rule and version, grants by action type, refusals by what refused (the reason up to its first ": ", e.g.
    "cap:<id>", "budget:<name>", "timers")."""
    out: dict[str, int] = {}
    for d in decisions:
        if isinstance(d, dict):  # a journal entry given as a dict (tests, tools): what it has
            c, rule, version, actions, error, refused = (d["campaign"], d.get("rule"), d.get("script_version"),
                                                         d.get("actions") or (), d.get("error"),
                                                         d.get("refused") or ())
            if rule is None:
                continue
        else:
            c, rule, version, actions, error, refused = d[0], d[4], d[5], d[6], d[8], d[9]
        keys = [f"{c}\x00runs\x00{rule}\x00{version}"]
        if error is not None:
            keys.append(f"{c}\x00errors\x00{rule}\x00{version}")
        keys += [f"{c}\x00grants\x00{a['type']}" for a in actions]
        keys += [f"{c}\x00refusals\x00{r['reason'].partition(': ')[0]}" for r in refused]
        for key in keys:
            out[key] = out.get(key, 0) + 1
    return out


class _Unit:
    """What one commit writes to one key group."""

    __slots__ = ("decisions", "failed", "kg", "offset", "outbox", "recorded", "rejected", "replayed", "sends", "snaps",
                 "streams", "timers")

    def __init__(self, kg: int) -> None:
        self.kg = kg
        self.snaps: list[Any] = []
        self.decisions: list[Any] = []
        self.outbox: list[bytes] = []
        self.failed: list[bytes] = []
        self.rejected: list[bytes] = []
        self.streams: dict[str, list[bytes]] = {}
        self.sends: dict[int, list[EventIn]] = {}  # target group -> events rules sent there
        self.timers: list[tuple[Any, ...]] = []  # the timer changes' arguments, in order
        self.replayed: list[str] = []  # failed-runs entry ids whose replay ran in this batch
        self.recorded: list[EventIn] = []  # the events its journal entry's runs decided (field "e")
        self.offset = ""


class RedisStore:
    """Snapshots, journal, outbox and failed runs of key groups in Redis; every commit is one round trip."""

    def __init__(
        self, client: redis.Redis, key_groups: int, journal_maxlen: int = 20_000, per_group_calls: bool = False,
        wait_fsync_ms: int | None = None,
    ) -> None:
        """`per_group_calls`: one script call per key group; else one call per commit. A Redis Cluster client
        (store.connect) always makes one call per group, and routes what lives in other slots through the outbox
        (see the module doc). `wait_fsync_ms`: follow every commit, in the same round trip, by WAITAOF 1 0 <ms>
        (Redis 7.2+, one server only), so that it returns only once the commit is fsynced to the AOF."""
        self.cluster = is_cluster_client(client)
        kwargs = client.get_connection_kwargs() if self.cluster else client.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError("RedisStore needs a client with decode_responses=False (snapshots are bytes)")
        if key_groups < 1 or journal_maxlen < 1:
            raise ValueError("key_groups and journal_maxlen must be >= 1")
        if self.cluster and wait_fsync_ms is not None:
            raise ValueError("wait_fsync_ms (WAITAOF) is for one Redis server: on a Redis Cluster, set every node's "
                             "appendfsync (store.durability)")
        per_group_calls = per_group_calls or self.cluster
        self.client = client
        self.key_groups = key_groups
        self.journal_maxlen = journal_maxlen
        self.round_trips = 0  # network exchanges made by this store, for tests and metrics
        self.last_stats: dict[str, int] = {}  # the stat counters the last commit added (all its groups)
        self.per_group_calls = per_group_calls
        self.wait_fsync_ms = wait_fsync_ms
        self._script = client.register_script(lua("commit"))
        self._loaded = False
        self._token_prefix = os.urandom(6).hex()
        self._seq = 0
        self._prefix = [group_prefix(kg) for kg in range(key_groups)]

    # -- keys --------------------------------------------------------------------------------------
    def group_of(self, user_key: str) -> int:
        return key_group(user_key, self.key_groups)

    def users_key(self, kg: int) -> str:
        return self._prefix[kg] + "users"

    def epoch_key(self, kg: int) -> str:
        return self._prefix[kg] + "epoch"

    def outbox_key(self, kg: int) -> str:
        return self._prefix[kg] + "outbox"

    def failed_key(self, kg: int) -> str:
        return self._prefix[kg] + "failed"

    def journal_key(self, kg: int) -> str:
        return self._prefix[kg] + "journal"

    def input_key(self, kg: int) -> str:
        return self._prefix[kg] + "in"

    def offset_key(self, kg: int) -> str:
        return self._prefix[kg] + "offset"

    def timers_key(self, kg: int) -> str:
        return self._prefix[kg] + "timers"

    def timer_events_key(self, kg: int) -> str:
        return self._prefix[kg] + "timer_events"

    # -- ownership ---------------------------------------------------------------------------------
    def claim(self, groups: Iterable[int]) -> dict[int, int]:
        """Become the owner of these groups: INCR each epoch, which fences out any older owner."""
        groups = list(groups)
        if not groups:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for kg in groups:
            pipe.incr(self.epoch_key(kg))
        self.round_trips += 1
        return {kg: int(e) for kg, e in zip(groups, pipe.execute(), strict=True)}

    def epoch(self, kg: int) -> int:
        """The group's current owner epoch (0 when never claimed)."""
        self.round_trips += 1
        return int(self.client.get(self.epoch_key(kg)) or 0)

    # -- reads -------------------------------------------------------------------------------------
    def load(self, user_keys: Iterable[str]) -> dict[str, bytes | None]:
        """Snapshots of these users (None for a user never committed), in one pipelined round trip."""
        by_group: dict[int, list[str]] = {}
        n = self.key_groups
        for k in user_keys:
            kg = key_group(k, n)
            g = by_group.get(kg)
            if g is None:
                by_group[kg] = [k]
            else:
                g.append(k)
        if not by_group:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for kg, keys in by_group.items():
            pipe.hmget(self.users_key(kg), keys)
        self.round_trips += 1
        out: dict[str, bytes | None] = {}
        for keys, blobs in zip(by_group.values(), pipe.execute(), strict=True):
            out.update(zip(keys, blobs, strict=True))
        return out

    def snapshot_of(self, user_key: str) -> bytes | None:
        """One user's committed snapshot, or None."""
        self.round_trips += 1
        blob: Any = self.client.hget(self.users_key(self.group_of(user_key)), user_key)
        return blob  # type: ignore[no-any-return]

    def scan_users(self, kg: int, count: int = 1000) -> Iterator[tuple[str, bytes]]:
        """Every (user_key, snapshot) of a group, for a bulk load at start (HSCAN, not one huge reply)."""
        for k, v in self.client.hscan_iter(self.users_key(kg), count=count):
            yield k.decode(), v

    def offsets(self, groups: Iterable[int]) -> dict[int, str]:
        """The last input entry each group's committed batches consumed ("0-0" when none yet)."""
        groups = list(groups)
        if not groups:
            return {}
        self.round_trips += 1
        keys = [self.offset_key(kg) for kg in groups]
        values: Any = execute(self.client, [Cmd(("GET", k)) for k in keys]) if self.cluster else self.client.mget(keys)
        for v in values:
            if isinstance(v, Exception):
                raise v
        return {kg: (v.decode() if v else "0-0") for kg, v in zip(groups, values, strict=True)}

    def journal(self, user_key: str, limit: int = 20) -> list[dict[str, Any]]:
        """The user's decisions (rule runs), newest first, found in its group's recent journal."""
        if limit <= 0:
            return []
        return self.journals([user_key], limit)[user_key][::-1][:limit]

    def journals(self, user_keys: Iterable[str], limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
        """The recent decisions of several users, oldest first, from their groups' journals: each group's
        newest JOURNAL_SCAN batches are read back (newest first, in pages of JOURNAL_PAGE; the first page of
        every group in one round trip) until `limit` decisions of every user asked for are found."""
        wanted: dict[int, dict[str, list[dict[str, Any]]]] = {}
        for k in user_keys:
            wanted.setdefault(key_group(k, self.key_groups), {})[k] = []
        if not wanted:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for kg in wanted:
            pipe.xrevrange(self.journal_key(kg), count=JOURNAL_PAGE)
        self.round_trips += 1
        for (kg, found), page in zip(wanted.items(), pipe.execute(), strict=True):
            scanned = 0
            while page:
                for _, fields in page:
                    _collect(_unpack(fields[b"d"]), found)
                scanned += len(page)
                done = limit is not None and all(len(v) >= limit for v in found.values())
                if done or len(page) < JOURNAL_PAGE or scanned >= JOURNAL_SCAN:
                    break
                self.round_trips += 1
                # XREVRANGE's end is inclusive: "(" + id starts right after the oldest entry read
                page = self.client.xrevrange(self.journal_key(kg), max=b"(" + page[-1][0], count=JOURNAL_PAGE)
        return {k: v for found in wanted.values() for k, v in found.items()}

    # -- the commit --------------------------------------------------------------------------------
    def commit(
        self,
        epochs: Mapping[int, int],
        snapshots: Mapping[str, bytes],
        journal: Iterable[Decision] = (),
        actions: Iterable[Mapping[str, Any]] = (),
        failed: Iterable[Mapping[str, Any]] = (),
        stream_targets: Mapping[str, str] | None = None,
        webhook_gameplays: Collection[str] = (),
        batch_id: str | None = None,
        offsets: Mapping[int, str] | None = None,
        rejected: Mapping[int, list[bytes]] | None = None,
        sends: Iterable[tuple[str, EventIn]] = (),
        timers: Iterable[tuple[str, str, str, int, Fired | None]] = (),
        replayed: Iterable[tuple[str, str]] = (),
        recorded: Iterable[tuple[str, EventIn]] = (),
    ) -> list[int]:
        """Write one micro-batch: one atomic unit per key group touched, all in one round trip.

        `offsets`: per group, the last entry of its input partition this batch consumed (written in the unit);
        `rejected`: per group, invalid input events to add to `playbus:rejected` (field "rejected").
        `sends`: (sender's user key, event) of the events rules made for other users, added to their groups' input
        partitions by the unit of the sender; `timers`: timer changes in decision order (see engine.TimerOp);
        `replayed`: (user key, "<group>/<entry id>") of failed runs replayed successfully, removed from the group's
        failed runs in the same unit; `recorded`: (user key, event) of the events whose rules ran in this batch
        (store.recorded.ran_rules), written into their group's journal entry (field "e", read back by backtests;
        ignored for a group whose share has no journal entry).

        Each unit checks the group's epoch against `epochs` first and writes nothing when fenced; the
        other groups are committed and FencedError lists the fenced ones. Every unit carries a batch
        token (`batch_id`, default a fresh one), so re-sending the same commit after a connection error
        (redis-py's own retry, or the caller's with the same `batch_id`) writes nothing twice; only the
        group's last token is kept, so retry a commit before making the next one. Actions of
        `stream_targets` gameplays go to that stream, of `webhook_gameplays` to the group's outbox; any
        other gameplay is a ValueError before anything is written. Returns the groups committed.
        """
        units: dict[int, _Unit] = {}
        unit_of: dict[str, _Unit] = {}
        n = self.key_groups

        def unit(ukey: str) -> _Unit:
            kg = key_group(ukey, n)
            u = units.get(kg)
            if u is None:
                u = units[kg] = _Unit(kg)
            unit_of[ukey] = u
            return u

        for ukey, blob in snapshots.items():
            u = unit_of.get(ukey) or unit(ukey)
            u.snaps += (ukey, blob)
        for entry in journal:
            ukey = user_key(entry["campaign"], entry["user"])
            (unit_of.get(ukey) or unit(ukey)).decisions.append(entry)
        targets = stream_targets or {}
        if self.cluster and targets:  # their streams are in other slots: through the outbox (module doc)
            webhook_gameplays = {*webhook_gameplays, *targets}
            targets = {}
        for a in actions:
            ukey = user_key(a["campaign"], a["user"])
            u = unit_of.get(ukey) or unit(ukey)
            gameplay = a["type"].split(".", 1)[0]
            stream = targets.get(gameplay)
            if stream is not None:
                s = u.streams.get(stream)
                if s is None:
                    s = u.streams[stream] = []
                s.append(_dumps(a))
            elif gameplay in webhook_gameplays:
                u.outbox.append(_dumps(a))
            else:
                raise ValueError(f"action {a.get('id')!r}: no target for gameplay {gameplay!r}")
        for f in failed:
            ev = f["event"]
            ukey = user_key(ev["campaign"], ev["user"])
            u = unit_of.get(ukey) or unit(ukey)
            u.failed.append(_dumps(f))
        for sender, ev in sends:
            u = unit_of.get(sender) or unit(sender)
            target = key_group(user_key(ev.campaign, ev.user), n)
            u.sends.setdefault(target, []).append(ev)
        for ukey, (op, _, tid, due, fired) in ((t[1], t) for t in timers):
            u = unit_of.get(ukey) or unit(ukey)
            if op == "set":
                assert fired is not None
                u.timers.append(("S", tid, due, _pack(fired)))
            else:
                u.timers.append(("D", tid))
        for ukey, failed_id in replayed:
            (unit_of.get(ukey) or unit(ukey)).replayed.append(failed_id.partition("/")[2])
        for ukey, ev in recorded:  # only beside a journal entry: a group with no other write gets no unit for it
            ru = unit_of.get(ukey) or units.get(key_group(ukey, n))
            if ru is not None:
                ru.recorded.append(ev)
        for kg, offset in (offsets or {}).items():
            units.setdefault(kg, _Unit(kg)).offset = offset
        for kg, entries in (rejected or {}).items():
            units.setdefault(kg, _Unit(kg)).rejected += entries
        if not units:
            return []
        missing = sorted(kg for kg in units if kg not in epochs)
        if missing:
            raise ValueError(f"commit touches key groups {missing} that the caller has not claimed")

        if batch_id is None:
            self._seq += 1
            batch_id = f"{self._token_prefix}-{self._seq}"
        totals: dict[str, int] = {}
        calls = [self._unit_call(u, epochs[u.kg], batch_id, totals) for u in units.values()]
        self.last_stats = totals
        results = self._run(calls)
        fenced: list[str] = []
        errors: list[str] = []
        done: list[int] = []
        for kg, r in zip(units, results, strict=True):
            if isinstance(r, Exception):
                errors.append(f"group {kg}: {r}")
            elif r[0] == b"FENCED":
                fenced.append(f"{kg}")
            elif r[0] == b"WRONGTYPE":
                key, kind = (x.decode("utf-8", "replace") for x in r[1:3])
                errors.append(f"group {kg}: key {key!r} holds a {kind}, not what playbus writes there "
                              f"(nothing of this group was written; fix or delete that key)")
            else:
                done.append(kg)
        if errors:
            raise StoreError("commit failed for " + "; ".join(errors))
        if fenced:
            raise FencedError(
                f"key groups {', '.join(fenced)} were claimed by a newer owner; their writes were dropped",
                ",".join(fenced),
            )
        return done

    def _unit_call(self, u: _Unit, epoch: int, batch_id: str, totals: dict[str, int]) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV of one group's commit unit (see commit.lua)."""
        p = self._prefix[u.kg]
        keys: list[Any] = [p + "epoch", p + "batch", p + "users", p + "journal", p + "in", p + "offset", p + "timers",
                           p + "timer_events", p + "stats", p + "failed"]
        body: list[Any] = []
        nstreams = 0
        rejected_to = p + "outbox" if self.cluster else REJECTED_STREAM  # another slot on a cluster: forwarded
        for key, field, values in ((p + "outbox", "action", u.outbox), (p + "failed", "entry", u.failed),
                                   (rejected_to, "rejected", u.rejected)):
            if values:
                keys.append(key)
                body += (len(keys), field, len(values), *values)
                nstreams += 1
        for stream, payloads in u.streams.items():
            keys.append(stream)
            body += (len(keys), "action", len(payloads), *payloads)
            nstreams += 1
        for target, events in u.sends.items():
            if self.cluster and target != u.kg:  # another slot: through the outbox (module doc)
                continue
            keys.append(self._prefix[target] + "in")
            body += (len(keys), "events", 1, encode_events(events))
            nstreams += 1
        if self.cluster:
            forwards = [_pack((target, encode_events(events))) for target, events in u.sends.items() if target != u.kg]
            if forwards:
                keys.append(p + "outbox")
                body += (len(keys), "send", len(forwards), *forwards)
                nstreams += 1
        journal = _pack(u.decisions) if u.decisions else ""
        recorded = encode_events(u.recorded) if u.recorded and u.decisions else ""
        args: list[Any] = [epoch, batch_id, len(u.snaps) // 2, journal, self.journal_maxlen, u.offset, nstreams,
                           len(u.timers), recorded]
        args += u.snaps
        args += body
        for op in u.timers:
            args += op
        stats = stat_counts(u.decisions)
        args.append(len(stats))
        for f, n in stats.items():
            args += (f, n)
            totals[f] = totals.get(f, 0) + n
        args.append(len(u.replayed))
        args += u.replayed
        return keys, args

    def _run(self, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        """EVALSHA the units in one pipeline, one call per unit or all in one call (not redis-py's pipelined
        Script, which asks SCRIPT EXISTS first: a second round trip). NOSCRIPT (a restarted or flushed
        Redis) loads the scripts and re-sends what failed."""
        if not self._loaded:
            self._load_scripts()
        if not self.per_group_calls:
            keys: list[Any] = []
            args: list[Any] = [len(calls)]
            for k, a in calls:
                keys += k
                args += (len(k), len(a), *a)
            for attempt in range(3):
                self.round_trips += 1
                try:
                    out: Any = self._evalsha_raw(self._script.sha, keys, args)
                    return list(out)
                except NoScriptError:
                    if attempt:
                        raise
                    self._load_scripts()
                except (redis.ConnectionError, redis.TimeoutError):
                    if attempt == 2:
                        raise
                    # The batch token makes a re-sent commit a no-op for the groups that did land.
        sha = self._script.sha
        if self.cluster:
            return self._run_cluster(sha, calls)
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for i in todo:
                keys, args = calls[i]
                pipe.evalsha(sha, len(keys), *keys, 1, len(keys), len(args), *args)
            if self.wait_fsync_ms is not None:
                pipe.execute_command("WAITAOF", 1, 0, self.wait_fsync_ms)  # type: ignore[no-untyped-call]
            self.round_trips += 1
            out = pipe.execute(raise_on_error=False)
            if self.wait_fsync_ms is not None:
                self._check_fsync(out.pop())
            retry = []
            for i, r in zip(todo, out, strict=True):
                if isinstance(r, NoScriptError):
                    retry.append(i)
                results[i] = r if isinstance(r, Exception) else r[0]  # one unit per call
            if not retry or attempt:
                break
            self._load_scripts()
            todo = retry
        return results

    def _run_cluster(self, sha: str, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        """One EVALSHA per unit, pipelined over the nodes (store.slots: TRYAGAIN while the group's slot migrates is
        sent again, NOSCRIPT loads the script on every primary); a re-sent unit is a no-op by its batch token."""
        self.round_trips += 1
        cmds = [Cmd(("EVALSHA", sha, len(keys), *keys, 1, len(keys), len(args), *args)) for keys, args in calls]
        out = execute(self.client, cmds, scripts=[lua("commit")])
        return [r if isinstance(r, Exception) else r[0] for r in out]

    def _evalsha_raw(self, sha: str, keys: list[Any], args: list[Any]) -> Any:
        """EVALSHA with the command packed by hiredis in one call: redis-py's own path checks every argument
        in Python, about 2 us per event for the ~8 arguments an event brings to a commit."""
        packed = [pack_command(("EVALSHA", sha, len(keys), *keys, *args))]
        if self.wait_fsync_ms is not None:
            packed.append(pack_command(cast(Any, ("WAITAOF", 1, 0, self.wait_fsync_ms))))
        pool = self.client.connection_pool
        conn: Any = pool.get_connection()
        try:
            conn.send_packed_command(packed)
            out = conn.read_response()
            if self.wait_fsync_ms is not None:
                self._check_fsync(conn.read_response())
            return out
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def _check_fsync(self, reply: Any) -> None:
        """WAITAOF answers [local fsyncs, replica fsyncs]; anything but a local fsync fails the commit's answer
        (the commit may have landed: a retry is answered `duplicate`)."""
        if isinstance(reply, Exception) or not reply or int(reply[0]) < 1:
            raise StoreError(f"the commit was not fsynced to the AOF within {self.wait_fsync_ms} ms ({reply!r})")

    def _load_scripts(self) -> None:
        if self.cluster:
            load_scripts(self.client, [lua("commit")])  # on every primary
            self.round_trips += 1
            self._loaded = True
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.script_load(lua("commit"))
        pipe.execute()
        self.round_trips += 1
        self._loaded = True
