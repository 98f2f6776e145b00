"""Soak: a long fault run against a real cluster, checked against a reference model (`make soak`).

    python -m playbus.loadtest.soak [--minutes 5] [--users 400] [--producers 4] [--shards 2] [--seed N]
                                [--timer-ms 1500] [--keep DIR]

Starts its own cluster (run_cluster.py as a subprocess, embedded Redis in a temp dir) with a small test config
written to a temp dir, then runs producers for `--minutes`, every event with a unique id, and every 15-25 s
injects the next fault of a cycle that holds every kind (in an order drawn from the seed):

  kill_shard     SIGKILL of a shard worker (`ray::_UserActivityActor`); Ray restarts it, callers retry
  stop_shard     SIGSTOP of a shard worker for 30 s, past the watchdog's health timeout (run_cluster restarts
                 a shard that misses 3 health calls 5 s apart), then SIGCONT
  redis_stall    `CLIENT PAUSE 3000 ALL` on the embedded Redis: every client blocks for 3 s
  redis_oom      Redis refusing writes for 3 s (`CONFIG SET maxmemory` just above what it uses; noeviction)
  wrong_type     a key a commit writes (a group's journal) holds a string for 3 s: that group's commits fail,
                 with nothing written, until it is deleted
  kill_router    SIGKILL of the input router (`ray::_InputRouterActor`) while stream producers write
  kill_delivery  SIGKILL of the delivery actor (`ray::_DeliveryActor`) while webhook actions flow
  kill_ingress   SIGKILL of the Serve replica (`ray::ServeReplica:playbus:Ingress`)
  hot_reload     a new version of the `count` script pushed and activated through the admin API
(The embedded redis-server is owned by run_cluster.py and is not killed: Redis crashes with AOF are covered by
tests/integration/test_cluster.py.)

The test campaign ("soak"): every event `soak.tick` runs three rules, in order:
  count   ctx.soak.count += 1; every Nth event (`--every`) emits soak.milestone {n} (a stream target), every
          Bth (`--bonus`) bonus.grant {n} (a webhook: a receiver inside the soak, answering 503 to 10% of calls)
  reward  for a task event (data.task): ctx.soak.tasks += 1; emits lottery.grant_chance {day} (capped per user
          per day, `--cap`) and wallet.grant_cash {amount_cents} (from a campaign-wide budget, `--budget`).
  link    for a task event: send(data.partner, "soak.credit", {from}), the partner being a soak user its
          producer drew (an HTTP user's partner is an HTTP user, a stream user's a stream user, perhaps itself),
          and later(`--timer-ms`, "soak.due", {of}) with no key (every task's timer is its own), counted in
          ctx.soak.pending. playbus refuses a `later` past 256 timers pending per user, and a stream user's
          backlog after an outage passes that (its events set timers due at once faster than they fire): once
          200 are pending, the rule skips the timer instead (ctx.soak.skipped += 1, emits soakdue.skipped {of}).
The events those make run one rule each:
  credit  on soak.credit (sent): ctx.soak.credits += 1; emits soakcredit.got {from} (a stream target): one
          action id per send, derived from the sent event's id.
  due     on soak.due (a timer, fired once event.ts + `--timer-ms` has passed on the wall clock):
          ctx.soak.dues += 1, ctx.soak.pending -= 1; emits soakdue.fired {of, due} (a stream target): one
          action id per timer, derived from the timer's id.
Beside it, a "hostile" campaign whose rule hoards memory and sometimes loops, fed by its own producer: the soak
campaign's events must never fail because of it.

Event times: a user's clock starts two days before the run (plus up to 6 h) and advances 10-60 min an event
until it reaches the wall clock, then follows it. So a user's first ~80 events cross days (the daily cap
starts over) and their timers are due at once; the rest are live, and their timers come due `--timer-ms`
after the event was made, while the faults go on. (The campaign window, 2026-2036, holds both.)

HTTP users belong to one producer each, which sends a chunk of events as one request and waits for it
(resending the same chunk, same ids, until answered). Stream users (`--stream-users`) belong to a stream
producer: half of them write record batches straight into the input partitions (StreamProducer), half single
events to `playbus:in` (routed into the partitions). Either way a user's events are applied in the order they
were made, so the model knows which event is each user's Nth and which tasks are each day's first `cap`; it
also knows each task's partner and timer. After the load, the soak waits for the inputs to be consumed, the
bonus actions delivered, every send decided and every timer fired (`settle`). At the end:

  1. every HTTP event got exactly one final answer, applied or duplicate (none lost, none rejected, none failed);
  2. per user, soak.count and soak.tasks in the committed context (GET .../context) equal the events sent;
     soak.credits equals the task events that named the user as partner (every send decided exactly once:
     `sent_credits`), soak.dues the user's task events less the timers skipped (every timer fired exactly once,
     none pending: `timer_dues`);
  3. every expected milestone and lottery action id is in its target stream exactly once, nothing else is;
     each milestone's params.n is the position the model expects (a doubly applied or reordered event would
     shift it); every send's soakcredit.got action (its id derived from the sent event's id "s-...", its cause
     that id, its params.from the task event) is in its stream exactly once, none unknown (`credit_actions`:
     names a lost or doubled send); every task has exactly one action in the soakdue stream, once:
     soakdue.fired (its id derived from the timer's id "t-...", its cause that id, its params.of the task
     event) or soakdue.skipped (caused by the task event), none unknown (`due_actions`; the summary adds how
     late the live timers fired, by the stream entries' times);
  4. no user got more than `cap` lottery chances on any day; cash actions are unique, each caused by a task
     event of ours with the right id and amount, and together never exceed the budget;
  5. every bonus action reached the webhook at least once (with the same id on every attempt), none unknown;
  6. every action answered in an `applied` result is in its stream; the last chunk of every producer, resent,
     is all `duplicate`; a soak.credit posted by a gameplay is `rejected` (only rules make that type);
     run_cluster.py stops cleanly on SIGTERM.

Prints progress every ~10 s, then a table of the faults injected and of the invariants; exit code 0 only on
PASS. `--keep DIR` keeps the embedded Redis's data (DIR/redis) and run_cluster.py's output (DIR/cluster.log)
for a post-mortem.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from playbus.actors.engine.clock import CampaignClock
from playbus.actors.engine.keys import action_id, derived_event_id
from playbus.actors.store.leases import budget_key
from playbus.loadtest.harness import LatencyRecorder, TimedClient
from playbus.loadtest.launcher import ClusterProcess, StopReport, http_get
from playbus.loadtest.stats import percentile

CAMPAIGN = "soak"
TZ = "Asia/Shanghai"
STARTS = "2026-01-01T00:00:00+08:00"
ENDS = "2036-01-01T00:00:00+08:00"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00+08:00
MILESTONES = "playbus:actions:soak"
LOTTERY = "playbus:actions:lottery"
WALLET = "playbus:actions:wallet"
DUES = "playbus:actions:soakdue"
CREDITS = "playbus:actions:soakcredit"
HISTORY_MS = 2 * 86_400_000  # a user's event clock starts this long before the run, then catches up
MAX_PENDING = 200  # the link rule skips a task's timer while the user has this many pending (playbus: 256)
SHARD_TITLE = "ray::_UserActivityActor"
INGRESS_TITLE = "ray::ServeReplica:playbus:Ingress"
MAX_STALL_S = 60  # the longest time without an answer that the soak accepts (a stopped shard's restart: ~20 s)
ROUTER_TITLE = "ray::_InputRouterActor"
DELIVERY_TITLE = "ray::_DeliveryActor"
HOSTILE = "hostile"
ADMIN_TOKEN = "soak-admin-token"
FAULT_KINDS = ("kill_shard", "stop_shard", "redis_stall", "redis_oom", "wrong_type", "kill_router",
               "kill_delivery", "kill_ingress", "hot_reload", "rescale")
KILL_TITLES = {"kill_shard": SHARD_TITLE, "kill_router": ROUTER_TITLE, "kill_delivery": DELIVERY_TITLE,
               "kill_ingress": INGRESS_TITLE}

COUNT_LUA = """\
-- Every event counts; every {every}th event of a user emits a milestone (a stream-target action), every
-- {bonus}th a bonus (a webhook action).{reload}
function decide(event, ctx)
  local n = ctx:incr("soak.count", 1)
  if n % {every} == 0 then emit("soak.milestone", {{n = n}}) end
  if n % {bonus} == 0 then emit("bonus.grant", {{n = n}}) end
end
"""

HOSTILE_LUA = """\
-- A hostile rule beside the soak campaign: it keeps memory between runs, and sometimes never returns.
local kept = {}
function decide(event, ctx)
  kept[#kept + 1] = string.rep("x", 200000)
  if event.data.loop then while true do end end
  ctx:incr("hostile.n", 1)
end
"""

REWARD_LUA = """\
-- A task event: count it, ask for a (capped) lottery chance and for cash from the shared budget.
function decide(event, ctx)
  if not event.data.task then return end
  ctx:incr("soak.tasks", 1)
  emit("lottery.grant_chance", {chances = 1, day = today()})
  emit("wallet.grant_cash", {amount_cents = math.tointeger(event.data.cents)})
end
"""

LINK_LUA = """\
-- A task event also credits its partner (another soak user, data.partner) and sets a timer for its own user
-- {timer_ms} ms after the event's time, with no key: every task's timer is its own. playbus refuses a timer
-- past 256 pending per user, which a stream user's backlog after an outage passes (its events set timers that
-- are due at once faster than they fire): with {max_pending} pending (counted in soak.pending), the timer is
-- skipped instead, and an action says so.
function decide(event, ctx)
  if not event.data.task then return end
  send(event.data.partner, "soak.credit", {{from = event.id}})
  if (ctx:get("soak.pending") or 0) >= {max_pending} then
    ctx:incr("soak.skipped", 1)
    emit("soakdue.skipped", {{of = event.id}})
    return
  end
  ctx:incr("soak.pending", 1)
  later({timer_ms}, "soak.due", {{of = event.id}})
end
"""

CREDIT_LUA = """\
-- A credit sent by a partner's task event: counted, and an action whose id (derived from the sent event's) shows
-- it was decided once.
function decide(event, ctx)
  ctx:incr("soak.credits", 1)
  emit("soakcredit.got", {from = event.data.from})
end
"""

DUE_LUA = """\
-- A task's timer fired: counted, and an action whose id (derived from the timer's) shows it fired once.
function decide(event, ctx)
  ctx:incr("soak.pending", -1)
  ctx:incr("soak.dues", 1)
  emit("soakdue.fired", {of = event.data.of, due = now()})
end
"""

CONFIG_YAML = """\
shards: {shards}
key_groups: 32
dedup_window: 512
batch: {{max_events: 500, max_wait_ms: 2}}
sandbox: {{max_instructions: 200000, max_memory_kb: 4096}}
targets:
  soak: {{stream: "{milestones}"}}
  lottery: {{stream: "{lottery}"}}
  wallet: {{stream: "{wallet}"}}
  soakdue: {{stream: "{dues}"}}
  soakcredit: {{stream: "{credits}"}}
  bonus: {{webhook: "{webhook}", timeout_s: 2}}
campaigns:
  - id: {campaign}
    timezone: {tz}
    starts: {starts}
    ends: {ends}
    rules:
      - {{id: count, on: soak.tick, script: count.lua, emits: [soak.milestone, bonus.grant]}}
      - {{id: reward, on: soak.tick, script: reward.lua, emits: [lottery.grant_chance, wallet.grant_cash]}}
      - {{id: link, on: soak.tick, script: link.lua, emits: [soakdue.skipped], sends: [soak.credit, soak.due]}}
      - {{id: credit, on: soak.credit, script: credit.lua, emits: [soakcredit.got]}}
      - {{id: due, on: soak.due, script: due.lua, emits: [soakdue.fired]}}
    caps:
      - {{action: lottery.grant_chance, per_user: {cap}, period: day}}
    budgets:
      - {{name: cash, action: wallet.grant_cash, param: amount_cents, total: {budget}}}
  - id: {hostile}
    timezone: {tz}
    starts: {starts}
    ends: {ends}
    rules:
      - {{id: hoard, on: hostile.tick, script: hoard.lua, emits: []}}
"""

STATUS = {"applied": 1, "duplicate": 2, "rejected": 3}
STATUS_NAME = {0: "unanswered", 1: "applied", 2: "duplicate", 3: "rejected", 4: "other"}


def count_lua(every: int, bonus: int, reload: int = 0) -> str:
    return COUNT_LUA.format(every=every, bonus=bonus, reload=f"\n-- hot reload {reload}" if reload else "")


def write_config(base: Path, shards: int, every: int, bonus: int, cap: int, budget: int, webhook: str,
                 timer_ms: int) -> Path:
    (base / "count.lua").write_text(count_lua(every, bonus), encoding="utf-8")
    (base / "reward.lua").write_text(REWARD_LUA, encoding="utf-8")
    (base / "link.lua").write_text(LINK_LUA.format(timer_ms=timer_ms, max_pending=MAX_PENDING), encoding="utf-8")
    (base / "credit.lua").write_text(CREDIT_LUA, encoding="utf-8")
    (base / "due.lua").write_text(DUE_LUA, encoding="utf-8")
    (base / "hoard.lua").write_text(HOSTILE_LUA, encoding="utf-8")
    path = base / "soak.yaml"
    path.write_text(CONFIG_YAML.format(shards=shards, milestones=MILESTONES, lottery=LOTTERY, wallet=WALLET,
                                       dues=DUES, credits=CREDITS, campaign=CAMPAIGN, tz=TZ, starts=STARTS, ends=ENDS,
                                       cap=cap, budget=budget, webhook=webhook, hostile=HOSTILE),
                    encoding="utf-8")
    return path


# -- the reference model -----------------------------------------------------------------------------------
class SoakUser:
    """One user's events, made in order by its producer, and what the model expects of them."""

    __slots__ = ("index", "name", "rng", "clock", "live_from", "n", "tasks", "task_flags", "partner_of", "pool",
                 "answers", "status", "day", "day_tasks")

    def __init__(self, index: int, seed: int, start_ms: int) -> None:
        self.index = index
        self.name = f"s{seed}-u{index}"
        self.rng = random.Random(f"soak/{seed}/{index}")
        # Two days back, then 10-60 min an event until the wall clock is reached (see next_event).
        self.clock = max(T0, start_ms - HISTORY_MS) + self.rng.randrange(6 * 3_600_000)
        self.live_from = 0  # the first event whose ts is the wall clock (0: none yet)
        self.n = 0  # events made so far (the id of the next is n + 1)
        self.tasks = 0
        self.task_flags = bytearray(b"\0")  # [n] = 1 for a task event (index 0 unused)
        self.partner_of = array("i", [-1])  # [n] = the index of the user a task event n credits; -1 for no task
        self.pool: list[SoakUser] = [self]  # the users its partners are drawn from (set by main)
        self.answers = bytearray(b"\0")  # [n] = final answers received for event n
        self.status = bytearray(b"\0")  # [n] = STATUS of its last answer
        self.day = -1
        self.day_tasks = 0

    def event_id(self, n: int) -> str:
        return f"{self.name}-{n}"

    @staticmethod
    def cents(index: int, n: int) -> int:
        return 10 + (n * 37 + index * 11) % 91

    def next_event(self, model: Model) -> dict[str, Any]:
        # Never past the wall clock (a timer comes due `timer_ms` after a live event is made), always ascending.
        step = self.rng.randrange(10 * 60_000, 60 * 60_000)
        wall = int(time.time() * 1000)
        self.clock = max(self.clock + 1, min(self.clock + step, wall))
        self.n += 1
        if not self.live_from and self.clock >= wall:
            self.live_from = self.n
        n, eid = self.n, self.event_id(self.n)
        is_task = self.rng.random() < 0.4
        self.task_flags.append(1 if is_task else 0)
        self.answers.append(0)
        self.status.append(0)
        ev: dict[str, Any] = {"id": eid, "campaign": CAMPAIGN, "user": self.name, "type": "soak.tick",
                              "ts": self.clock}
        if n % model.every == 0:
            model.milestones[action_id(CAMPAIGN, self.name, eid, "count", 0)] = (self.name, n)
        if n % model.bonus == 0:
            model.bonuses[action_id(CAMPAIGN, self.name, eid, "count", 1 if n % model.every == 0 else 0)] = n
        if is_task:
            self.tasks += 1
            partner = self.pool[self.rng.randrange(len(self.pool))]
            self.partner_of.append(partner.index)
            ev["data"] = {"task": True, "cents": self.cents(self.index, n), "partner": partner.name}
            day = model.clock.day(self.clock)
            if day != self.day:
                self.day, self.day_tasks = day, 0
            if self.day_tasks < model.cap:
                self.day_tasks += 1
                model.chances[action_id(CAMPAIGN, self.name, eid, "reward", 0)] = (self.name, day)
        else:
            self.partner_of.append(-1)
            ev["data"] = {"task": False}
        return ev

    def due_ids(self, n: int) -> tuple[str, str]:
        """(timer event id, its soakdue.fired action id) of task event n: the link rule's `later` is its 2nd call."""
        tid = derived_event_id("t", CAMPAIGN, self.name, self.event_id(n), "link", 1)
        return tid, action_id(CAMPAIGN, self.name, tid, "due", 0)

    def credit_ids(self, n: int, partner: str) -> tuple[str, str]:
        """(sent event id, its soakcredit.got action id) of task event n: the link rule's `send` is its 1st call."""
        sid = derived_event_id("s", CAMPAIGN, self.name, self.event_id(n), "link", 0)
        return sid, action_id(CAMPAIGN, partner, sid, "credit", 0)

    def skip_id(self, n: int) -> str:
        """The soakdue.skipped action id of task event n (the link rule's only emit), had its timer been skipped."""
        return action_id(CAMPAIGN, self.name, self.event_id(n), "link", 0)


@dataclass
class Model:
    every: int
    bonus: int
    cap: int
    budget: int
    timer_ms: int = 1500
    bonuses: dict[str, int] = field(default_factory=dict)  # action id -> n
    clock: CampaignClock = field(default_factory=lambda: CampaignClock(TZ))
    milestones: dict[str, tuple[str, int]] = field(default_factory=dict)  # action id -> (user, n)
    chances: dict[str, tuple[str, int]] = field(default_factory=dict)  # action id -> (user, day)


# -- producers ---------------------------------------------------------------------------------------------
@dataclass
class Progress:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0  # distinct events made and sent (at least once)
    answered: int = 0  # final answers
    statuses: Counter[str] = field(default_factory=Counter)
    chunk_failures: Counter[str] = field(default_factory=Counter)  # attempts that raised, by error
    resent_chunks: int = 0
    rule_errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    answered_actions: dict[str, str] = field(default_factory=dict)  # action id -> type, from applied results
    gave_up: list[str] = field(default_factory=list)
    last_chunks: list[list[dict[str, Any]]] = field(default_factory=list)
    chunk_ms: list[float] = field(default_factory=list)
    last_cash_t: float = 0.0  # when the last cash grant was answered (the budget ran out about then)


def parse_eid(eid: str) -> tuple[int, int]:
    """(user index, n) of an id "s<seed>-u<index>-<n>"."""
    _, u, n = eid.rsplit("-", 2)
    return int(u[1:]), int(n)


class Producer(threading.Thread):
    def __init__(self, idx: int, url: str, users: list[SoakUser], model: Model, prog: Progress, chunk: int,
                 stop: threading.Event, hard_deadline: float, recorder: LatencyRecorder, seed: int) -> None:
        super().__init__(name=f"soak-producer-{idx}", daemon=True)
        self.users = users
        self.model = model
        self.prog = prog
        self.chunk = chunk
        self.stop_flag = stop
        self.hard_deadline = hard_deadline
        self.rng = random.Random(f"soak-producer/{seed}/{idx}")
        # One request per chunk: linger long enough that a chunk never leaves in two batches (flush sends it).
        self.client = TimedClient(url, recorder, max_batch=max(chunk, 1), linger_ms=2000, max_retries=8,
                                  timeout_s=60)
        self.last: list[dict[str, Any]] = []
        self.by_name = {u.name: u for u in users}

    def run(self) -> None:
        try:
            while not self.stop_flag.is_set():
                events = [self.rng.choice(self.users).next_event(self.model) for _ in range(self.chunk)]
                with self.prog.lock:
                    self.prog.sent += len(events)
                self._until_answered(events)
                self.last = events
        except Exception as e:  # noqa: BLE001 - reported as a failure of the run
            with self.prog.lock:
                self.prog.error_samples.append(f"{self.name} died: {type(e).__name__}: {e}")
                self.prog.gave_up.append(self.name)
        finally:
            self.client.close(30)

    def _send(self, events: list[dict[str, Any]]) -> list[dict[str, Any] | BaseException]:
        t = time.perf_counter()
        futures: list[Future[dict[str, Any]]] = [self.client.send(e) for e in events]
        self.client.flush()
        out: list[dict[str, Any] | BaseException] = []
        for f in futures:
            try:
                out.append(f.result())
            except Exception as e:  # noqa: BLE001
                out.append(e)
        with self.prog.lock:
            self.prog.chunk_ms.append((time.perf_counter() - t) * 1000)
        return out

    def _until_answered(self, events: list[dict[str, Any]]) -> None:
        """Send the chunk until every event has an answer; resend (same ids, same order) what failed."""
        todo = events
        attempt = 0
        while todo:
            results = self._send(todo)
            failed = []
            for ev, r in zip(todo, results, strict=True):
                if isinstance(r, BaseException):
                    failed.append(ev)
                    with self.prog.lock:
                        self.prog.chunk_failures[type(r).__name__] += 1
                        if len(self.prog.error_samples) < 10:
                            self.prog.error_samples.append(f"{ev['id']}: {type(r).__name__}: {r}")
                    continue
                self._record(ev, r)
            if failed and len(failed) != len(todo):
                # Part of a chunk failed: the order of a user's events would be at stake. Never expected
                # (a chunk is one request); say so loudly.
                with self.prog.lock:
                    self.prog.error_samples.append(f"{self.name}: a chunk was answered in part "
                                                   f"({len(todo) - len(failed)} of {len(todo)})")
            todo = failed
            if todo:
                attempt += 1
                with self.prog.lock:
                    self.prog.resent_chunks += 1
                if time.monotonic() > self.hard_deadline:
                    with self.prog.lock:
                        self.prog.gave_up.append(f"{self.name}: gave up on {len(todo)} events after "
                                                 f"{attempt} attempts")
                    return
                time.sleep(min(5.0, 0.5 * attempt))

    def _record(self, ev: dict[str, Any], r: dict[str, Any]) -> None:
        user = self.by_name[ev["user"]]
        _, n = parse_eid(ev["id"])
        status = r.get("status")
        code = STATUS.get(status, 4)  # type: ignore[arg-type]
        user.answers[n] = min(255, user.answers[n] + 1)
        user.status[n] = code
        with self.prog.lock:
            self.prog.answered += 1
            self.prog.statuses[str(status)] += 1
            if r.get("id") != ev["id"] and len(self.prog.error_samples) < 10:
                self.prog.error_samples.append(f"answer for {ev['id']} names {r.get('id')!r}")
            if r.get("errors"):
                self.prog.rule_errors += len(r["errors"])
                if len(self.prog.error_samples) < 10:
                    self.prog.error_samples.append(f"{ev['id']} {status}: {r['errors']}")
            if status == "applied":
                for a in r.get("actions") or ():
                    self.prog.answered_actions[a["id"]] = a["type"]
                    if a["type"] == "wallet.grant_cash":
                        self.prog.last_cash_t = time.monotonic()

    def resend_last(self) -> list[str]:
        """The last chunk again (after the run): every answer must be `duplicate`."""
        if not self.last:
            return []
        client = TimedClient(self.client.url, LatencyRecorder(), max_batch=max(self.chunk, 1), linger_ms=2000)
        try:
            return [r.get("status", "?") for r in client.send_many(self.last, timeout=120)]
        finally:
            client.close(30)


class StreamProducerThread(threading.Thread):
    """Stream users' events, each user's in order: half of the users' as record batches straight into their input
    partitions (StreamProducer), the other half's as single events XADDed to `playbus:in` (JSON)."""

    def __init__(self, redis_url: str, users: list[SoakUser], model: Model, stop: threading.Event,
                 prog: Progress, seed: int) -> None:
        super().__init__(name="soak-stream-producer", daemon=True)
        self.redis_url = redis_url
        self.users = users
        self.partitioned = {u.name for u in users[::2]}
        self.model = model
        self.stop_flag = stop
        self.prog = prog
        self.rng = random.Random(f"soak-stream/{seed}")
        self.sent = 0

    def run(self) -> None:
        import redis

        from playbus.actors.store.connect import connect
        from playbus.client import StreamProducer

        r = connect(self.redis_url, socket_timeout=30)
        producer = StreamProducer(r, batch=50)
        try:
            while not self.stop_flag.is_set():
                events = [self.rng.choice(self.users).next_event(self.model) for _ in range(100)]
                direct = [e for e in events if e["user"] in self.partitioned]
                routed = [e for e in events if e["user"] not in self.partitioned]
                while True:
                    try:
                        producer.send_many(direct)
                        pipe = r.pipeline(transaction=False)
                        for ev in routed:
                            pipe.xadd("playbus:in", {"event": json.dumps(ev)})
                        pipe.execute()
                        break
                    except redis.RedisError as e:
                        # Redis refusing writes (the redis_oom fault): what was added stays added; resending
                        # everything is safe, playbus answers the copies `duplicate` by their ids.
                        with self.prog.lock:
                            self.prog.chunk_failures[f"stream {type(e).__name__}"] += 1
                        time.sleep(0.5)
                self.sent += len(events)
                time.sleep(0.05)
        finally:
            r.close()


class HostileProducer(threading.Thread):
    """Events of the hostile campaign (one in five asks its rule to loop), answered or not: only the soak
    campaign's results are checked."""

    def __init__(self, url: str, stop: threading.Event, seed: int) -> None:
        super().__init__(name="soak-hostile", daemon=True)
        self.url = url
        self.stop_flag = stop
        self.rng = random.Random(f"soak-hostile/{seed}")
        self.answered = Counter[str]()

    def run(self) -> None:
        client = TimedClient(self.url, LatencyRecorder(), max_batch=20, linger_ms=5, max_retries=3, timeout_s=60)
        n = 0
        try:
            while not self.stop_flag.is_set():
                events = []
                for _ in range(20):
                    n += 1
                    events.append({"id": f"hostile-{n}", "campaign": HOSTILE, "user": f"h{self.rng.randrange(50)}",
                                   "type": "hostile.tick", "data": {"loop": self.rng.random() < 0.2}})
                try:
                    for r in client.send_many(events, timeout=120):
                        self.answered[r.get("status", "?")] += 1
                except Exception as e:  # noqa: BLE001 - faults may fail a request; not what is checked here
                    self.answered[type(e).__name__] += 1
                time.sleep(0.2)
        finally:
            client.close(10)


class Receiver:
    """The webhook of the bonus gameplay: records every action id it is sent; answers 503 to 10% of calls."""

    def __init__(self, seed: int) -> None:
        import asyncio
        import socket

        from aiohttp import web

        self.calls: Counter[str] = Counter()
        self.user_of: dict[str, str] = {}
        self.keys_ok = True
        self.rng = random.Random(f"soak-receiver/{seed}")
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/bonus"

        async def handle(request: web.Request) -> web.Response:
            body = json.loads(await request.read())
            with self._lock:
                self.calls[body["id"]] += 1
                self.user_of[body["id"]] = body["user"]
                if request.headers.get("Idempotency-Key") != body["id"]:
                    self.keys_ok = False
                fail = self.rng.random() < 0.1
            return web.Response(status=503 if fail else 200)

        app = web.Application()
        app.router.add_post("/bonus", handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.SockSite(self._runner, sock).start())
        self._thread = threading.Thread(target=self._loop.run_forever, name="soak-receiver", daemon=True)
        self._thread.start()

    def received(self) -> Counter[str]:
        with self._lock:
            return Counter(self.calls)

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# -- faults ------------------------------------------------------------------------------------------------
class Faults(threading.Thread):
    """Injects the next fault of a cycle holding every kind (order drawn from the seed) every `every` seconds."""

    def __init__(self, cluster: ClusterProcess, shards: int, stop: threading.Event, start: float, end: float,
                 every: tuple[float, float], stall_ms: int, users: list[SoakUser], model: Model, seed: int,
                 log: Any) -> None:
        super().__init__(name="soak-faults", daemon=True)
        self.cluster = cluster
        self.shards = shards
        self.stop_flag = stop
        self.start_t = start
        self.end_t = end
        self.every = every
        self.stall_ms = stall_ms
        self.users = users
        self.model = model
        self.rng = random.Random(f"soak-faults/{seed}")
        self.log = log
        self.done: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.reloads = 0

    def run(self) -> None:
        kinds = list(FAULT_KINDS)
        self.rng.shuffle(kinds)
        t = self.start_t + self.rng.uniform(*self.every)
        n = 0
        while t < self.end_t - 10:
            if self.stop_flag.wait(max(0.0, t - time.monotonic())):
                return
            kind = kinds[n % len(kinds)]
            n += 1
            rec: dict[str, Any] = {"kind": kind, "at_s": round(time.monotonic() - self.start_t, 1)}
            try:
                getattr(self, f"_{kind}", lambda r, k=kind: self._kill(KILL_TITLES[k], r))(rec)
                self.done.append(rec)
            except Exception as e:  # noqa: BLE001 - a fault that could not be injected is reported
                self.problems.append(f"{kind}: {type(e).__name__}: {e}")
                self.log(f"fault {kind} could not be injected: {type(e).__name__}: {e}")
            t = time.monotonic() + self.rng.uniform(*self.every)

    def _redis(self) -> Any:
        from playbus.actors.store.connect import connect

        return connect(self.cluster.redis_url, socket_timeout=10)

    def _pick(self, title: str) -> tuple[int, list[int]]:
        pids = self.cluster.processes(title)
        if not pids:
            raise RuntimeError(f"no process titled {title!r} found among run_cluster's processes")
        return self.rng.choice(pids), pids

    def _wait_replaced(self, title: str, pid: int, before: list[int], rec: dict[str, Any], t: float) -> None:
        while time.monotonic() - t < 90 and not self.stop_flag.is_set():
            now = set(self.cluster.processes(title))
            new = now - set(before)
            if new and pid not in now:
                rec["recovered_s"] = round(time.monotonic() - t, 1)
                self.log(f"  {title} back as pid {sorted(new)} after {rec['recovered_s']} s")
                return
            time.sleep(0.25)
        self.log(f"  no replacement {title} process seen within 90 s")

    def _kill(self, title: str, rec: dict[str, Any]) -> None:
        pid, pids = self._pick(title)
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rec["pid"] = pid
        self.log(f"FAULT {len(self.done) + 1}: SIGKILL {title} pid {pid}")
        self._wait_replaced(title, pid, pids, rec, t)

    def _stop_shard(self, rec: dict[str, Any]) -> None:
        pid, pids = self._pick(SHARD_TITLE)
        t = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        rec["pid"] = pid
        self.log(f"FAULT {len(self.done) + 1}: SIGSTOP shard worker pid {pid} for 30 s")
        self._wait_replaced(SHARD_TITLE, pid, pids, rec, t)  # the watchdog restarts it (about 15-20 s)
        self.stop_flag.wait(max(0.0, 30 - (time.monotonic() - t)))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            self.log(f"  pid {pid} continued")

    def _redis_stall(self, rec: dict[str, Any]) -> None:
        r = self._redis()
        try:
            r.execute_command("CLIENT", "PAUSE", str(self.stall_ms), "ALL")
        finally:
            r.close()
        rec["ms"] = self.stall_ms
        self.log(f"FAULT {len(self.done) + 1}: Redis stalled with CLIENT PAUSE {self.stall_ms} ALL")

    def _redis_oom(self, rec: dict[str, Any]) -> None:
        r = self._redis()
        try:
            used = int(r.info("memory")["used_memory"])
            r.config_set("maxmemory", used + 65536)
            self.log(f"FAULT {len(self.done) + 1}: Redis refuses writes for 3 s (maxmemory {used + 65536})")
            self.stop_flag.wait(3.0)
        finally:
            r.config_set("maxmemory", 0)
            r.close()
        rec["ms"] = 3000

    def _wrong_type(self, rec: dict[str, Any]) -> None:
        from playbus.actors.engine.keys import group_prefix, key_group, user_key

        u = self.rng.choice([u for u in self.users if u.n > 0] or self.users)
        key = user_key(CAMPAIGN, u.name)
        journal = group_prefix(key_group(key, 32)) + "journal"  # the group's journal stream
        aside = journal + ":soak-aside"
        r = self._redis()
        moved = False
        try:
            moved = bool(r.exists(journal))
            if moved:
                r.rename(journal, aside)  # kept whole: the group's commits fail meanwhile, nothing is written to it
            r.set(journal, "not a stream")
            self.log(f"FAULT {len(self.done) + 1}: {journal!r} holds a string for 3 s")
            self.stop_flag.wait(3.0)
        finally:
            r.delete(journal)
            if moved:
                r.rename(aside, journal)
            r.close()
        rec["key"] = journal

    def _admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        import http.client

        conn = http.client.HTTPConnection(self.cluster.host, self.cluster.port, timeout=30)
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None,
                         {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def _rescale(self, rec: dict[str, Any]) -> None:
        """Move key groups to another number of shards (1 to shards + 2) under the load, and wait for the end."""
        status, doc = self._admin("GET", "/v1/shards")
        if status != 200:
            raise RuntimeError(f"GET /v1/shards answered {status}: {doc}")
        target = self.rng.choice([n for n in range(1, self.shards + 3) if n != doc["count"]])
        t = time.monotonic()
        status, doc = self._admin("POST", "/v1/shards", {"count": target})
        if status != 202:
            raise RuntimeError(f"POST /v1/shards answered {status}: {doc}")
        self.log(f"FAULT {len(self.done) + 1}: rescale from {doc['count']} to {target} shards")
        while time.monotonic() - t < 90 and not self.stop_flag.is_set():
            status, doc = self._admin("GET", "/v1/shards")
            if status == 200 and doc["count"] == target and not doc["rescaling"]:
                rec.update(target=target, recovered_s=round(time.monotonic() - t, 1),
                           pause_ms=doc["last"]["pause_ms"], problems=doc["last"]["problems"])
                self.log(f"  rescaled to {target} in {rec['recovered_s']} s, groups paused {rec['pause_ms']} ms")
                return
            time.sleep(0.25)
        raise RuntimeError(f"the rescale to {target} shards did not end within 90 s")

    def _hot_reload(self, rec: dict[str, Any]) -> None:
        import http.client

        self.reloads += 1
        source = count_lua(self.model.every, self.model.bonus, self.reloads).encode()
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        conn = http.client.HTTPConnection(self.cluster.host, self.cluster.port, timeout=30)
        try:
            conn.request("PUT", "/v1/scripts/count", source, {**headers, "Content-Type": "text/plain"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            if resp.status != 201:
                raise RuntimeError(f"push answered {resp.status}: {body}")
            version = body["version"]
            conn.request("POST", "/v1/scripts/count/activate", json.dumps({"version": version}),
                         {**headers, "Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"activate answered {resp.status}")
        finally:
            conn.close()
        rec["version"] = version
        self.log(f"FAULT {len(self.done) + 1}: count script version {version} pushed and activated")


# -- verification ------------------------------------------------------------------------------------------
def stream_entries(client: Any, stream: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(ms of the entry id: when it was added, action) of every entry, page by page."""
    start = "-"
    while True:
        page = client.xrange(stream, min=start, max="+", count=5000)
        if not page:
            return
        for entry_id, f in page:
            yield int(entry_id.split(b"-", 1)[0]), json.loads(f[b"action"])
        ms, seq = page[-1][0].decode().split("-")
        start = f"{ms}-{int(seq) + 1}"


def read_stream(client: Any, stream: str) -> list[dict[str, Any]]:
    return [a for _, a in stream_entries(client, stream)]


def get_user(cluster: ClusterProcess, user: str, what: str = "context") -> dict[str, Any]:
    """GET .../users/{user}/context ({"context", "timers"}) or .../decisions?limit=100 ({"decisions"})."""
    path = f"/v1/campaigns/{quote(CAMPAIGN, safe='')}/users/{quote(user, safe='')}/{what}"
    if what == "decisions":
        path += "?limit=100"
    for attempt in range(10):
        try:
            st, body = http_get(cluster.host, cluster.port, path, 30)
            if st == 200:
                return json.loads(body)  # type: ignore[no-any-return]
        except OSError:
            pass
        time.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"GET {what} of {user} failed 10 times")


def linkage_trouble(cluster: ClusterProcess, user: str) -> list[Any]:
    """What the user's journal shows of the link, credit and due rules going wrong (errors, refused timers)."""
    out: list[Any] = []
    for d in get_user(cluster, user, "decisions").get("decisions", []):
        if d.get("rule") in ("link", "credit", "due") and (d.get("error") or d.get("refused")):
            out.append({k: d.get(k) for k in ("event", "rule", "error", "refused")})
    return out[:3]


def verify(cluster: ClusterProcess, users: list[SoakUser], stream_users: list[SoakUser], model: Model,
           prog: Progress, resent: list[str], receiver: Receiver,
           forged: str) -> tuple[dict[str, bool], list[str], dict[str, Any]]:
    from playbus.actors.store.connect import connect

    checks: dict[str, bool] = {}
    problems: list[str] = []
    info: dict[str, Any] = {}

    def bad(check: str, msg: str) -> None:
        checks[check] = False
        if sum(p.startswith(check) for p in problems) < 12:
            problems.append(f"{check}: {msg}")

    # 1. answers
    checks["answers"] = True
    counts: Counter[str] = Counter()
    for u in users:
        for n in range(1, u.n + 1):
            times, code = u.answers[n], u.status[n]
            counts[STATUS_NAME[code]] += 1
            if times != 1 or code not in (1, 2):
                bad("answers", f"{u.event_id(n)}: {times} final answers, last {STATUS_NAME[code]}")
    info["final_answers"] = dict(counts)
    if prog.gave_up:
        bad("answers", f"producers gave up: {prog.gave_up}")
    checks["no_rule_errors"] = prog.rule_errors == 0
    if prog.rule_errors:
        problems.append(f"no_rule_errors: {prog.rule_errors} rule errors, e.g. {prog.error_samples[:3]}")

    # 2. committed contexts. Sends and timers are decided after their cause: a user still short of credits or
    # of dues and skips (or with timers pending) is read again for up to 60 s (`settle` waited for the timers).
    everyone = users + stream_users
    by_name = {u.name: u for u in everyone}
    by_index = {u.index: u for u in everyone}
    credits = Counter[int]()
    for u in everyone:
        credits.update(p for p in u.partner_of if p >= 0)
    seen: dict[str, dict[str, Any]] = {u.name: get_user(cluster, u.name) for u in everyone
                                       if u.n or credits[u.index]}

    def behind(u: SoakUser) -> bool:
        body = seen[u.name]
        ctx = body["context"]
        return (ctx.get("soak.credits", 0) < credits[u.index] or bool(body.get("timers"))
                or ctx.get("soak.dues", 0) + ctx.get("soak.skipped", 0) < u.tasks)

    late = [u for u in everyone if u.name in seen and behind(u)]
    info["users_read_again"] = len(late)
    t_late = time.monotonic()
    while late and time.monotonic() - t_late < 60:
        time.sleep(1.0)
        for u in late:
            seen[u.name] = get_user(cluster, u.name)
        late = [u for u in late if behind(u)]
    checks["contexts"] = checks["sent_credits"] = True
    journals = 0

    def journal(u: SoakUser) -> list[Any] | str:  # for the first few users that are off only
        nonlocal journals
        journals += 1
        return linkage_trouble(cluster, u.name) if journals <= 6 else "(not read)"

    for u in everyone:
        if u.name not in seen:
            continue
        ctx = seen[u.name]["context"]
        if ctx.get("soak.count") != u.n or ctx.get("soak.tasks", 0) != u.tasks:
            bad("contexts", f"{u.name}: context {ctx} but {u.n} events and {u.tasks} tasks were sent")
        if ctx.get("soak.credits", 0) != credits[u.index]:
            bad("sent_credits", f"{u.name}: soak.credits {ctx.get('soak.credits', 0)} but {credits[u.index]} task "
                                f"events named it partner; journal: {journal(u)}")
    info.update(credits_expected=sum(credits.values()), timers_expected=sum(u.tasks for u in everyone))

    r = connect(cluster.redis_url, socket_timeout=60)
    try:
        milestones = read_stream(r, MILESTONES)
        chances = read_stream(r, LOTTERY)
        cash = read_stream(r, WALLET)
        remaining = int(r.get(budget_key(CAMPAIGN, "cash")) or 0)
        # One soakdue action per task: fired (its id derived from the timer's) or skipped (from the task event's).
        # action id -> (user, task event id, the action's cause: the timer id, or the task event id when skipped)
        expected_dues: dict[str, tuple[str, str, str]] = {}
        pairs: list[tuple[str, str]] = []  # (fired id, skipped id) of every task
        for u in everyone:
            for n in range(1, u.n + 1):
                if u.task_flags[n]:
                    eid = u.event_id(n)
                    tid, fired = u.due_ids(n)
                    skipped = u.skip_id(n)
                    expected_dues[fired] = (u.name, eid, tid)
                    expected_dues[skipped] = (u.name, eid, eid)
                    pairs.append((fired, skipped))
        # every send's action: (action id -> (partner, task event id, sent event id))
        expected_credits: dict[str, tuple[str, str, str]] = {}
        for u in everyone:
            for n in range(1, u.n + 1):
                if u.task_flags[n]:
                    partner = by_index[u.partner_of[n]].name
                    sid, aid = u.credit_ids(n, partner)
                    expected_credits[aid] = (partner, u.event_id(n), sid)
        credit_count: Counter[str] = Counter()
        credit_wrong: list[Any] = []
        for _, a in stream_entries(r, CREDITS):
            credit_count[a["id"]] += 1
            exp = expected_credits.get(a["id"])
            if exp is not None and (a.get("user"), (a.get("params") or {}).get("from"), a.get("cause")) != exp:
                credit_wrong.append((a["id"], a.get("user"), a.get("params"), a.get("cause"), "expected", exp))
        due_count: Counter[str] = Counter()
        skips = Counter[str]()  # user -> skipped timers, as the stream shows them
        due_wrong: list[Any] = []
        lateness: list[float] = []
        for added_ms, a in stream_entries(r, DUES):
            due_count[a["id"]] += 1
            exp = expected_dues.get(a["id"])
            if exp is None:
                continue
            params = a.get("params") or {}
            if (a.get("user"), params.get("of"), a.get("cause")) != exp:
                due_wrong.append((a["id"], a.get("type"), a.get("user"), params.get("of"), a.get("cause"),
                                  "expected", exp))
            if a.get("type") == "soakdue.skipped":
                skips[exp[0]] += 1
                continue
            due, u = params.get("due"), by_name[exp[0]]
            if isinstance(due, int) and u.live_from and parse_eid(exp[1])[1] >= u.live_from:
                lateness.append(added_ms - due)  # a live timer: how long after its due time it fired
    finally:
        r.close()
    info.update(milestone_actions=len(milestones), lottery_actions=len(chances), cash_actions=len(cash),
                credit_actions=sum(credit_count.values()), due_actions=sum(due_count.values()),
                timers_skipped=sum(skips.values()), timers_fired=sum(due_count.values()) - sum(skips.values()))

    # timers: per user, soak.dues = its tasks less the timers skipped (as the stream shows them; soak.skipped too),
    # none pending (the GET's timers; soak.pending counts them for the link rule)
    checks["timer_dues"] = True
    for u in everyone:
        if u.name not in seen:
            continue
        ctx, pending = seen[u.name]["context"], seen[u.name].get("timers") or []
        dues, skipped = ctx.get("soak.dues", 0), ctx.get("soak.skipped", 0)
        if dues != u.tasks - skips[u.name] or skipped != skips[u.name] or ctx.get("soak.pending", 0) or pending:
            bad("timer_dues", f"{u.name}: soak.dues {dues} and soak.skipped {skipped} (stream: {skips[u.name]}) "
                              f"for {u.tasks} tasks, soak.pending {ctx.get('soak.pending')}, {len(pending)} timers "
                              f"pending (e.g. {pending[:2]}); journal: {journal(u)}")

    # 3. exactly-once stream actions against the model
    def exactly_once(check: str, landed: list[dict[str, Any]], expected: dict[str, Any]) -> None:
        checks[check] = True
        c = Counter(a["id"] for a in landed)
        twice = [i for i, k in c.items() if k > 1]
        missing = [i for i in expected if i not in c]
        extra = [i for i in c if i not in expected]
        if twice:
            bad(check, f"{len(twice)} action ids landed more than once, e.g. "
                       f"{[(i, c[i], expected.get(i)) for i in twice[:5]]}")
        if missing:
            bad(check, f"{len(missing)} expected actions missing, e.g. {[(i, expected[i]) for i in missing[:5]]}")
        if extra:
            by_id = {a["id"]: a for a in landed}
            bad(check, f"{len(extra)} unexpected actions, e.g. "
                       f"{[(by_id[i]['cause'], by_id[i]['params']) for i in extra[:5]]}")

    exactly_once("milestones", milestones, model.milestones)
    for a in milestones:
        want = model.milestones.get(a["id"])
        if want is not None and (a["user"], a["params"].get("n")) != want:
            bad("milestones", f"{a['id']} (cause {a['cause']}) has user/n {(a['user'], a['params'].get('n'))}, "
                              f"expected {want}")
    exactly_once("lottery", chances, model.chances)

    checks["credit_actions"] = True
    twice = [i for i, k in credit_count.items() if k > 1]
    missing = [i for i in expected_credits if i not in credit_count]
    extra = [i for i in credit_count if i not in expected_credits]
    if twice:
        bad("credit_actions", f"{len(twice)} sends decided more than once (partner, task, sent event), e.g. "
                              f"{[(credit_count[i], expected_credits.get(i)) for i in twice[:5]]}")
    if missing:
        bad("credit_actions", f"{len(missing)} sends never decided (partner, task, sent event), e.g. "
                              f"{[expected_credits[i] for i in missing[:5]]}")
    if extra:
        bad("credit_actions", f"{len(extra)} unexpected soakcredit actions, e.g. {extra[:5]}")
    if credit_wrong:
        bad("credit_actions", f"{len(credit_wrong)} soakcredit actions with the wrong user/from/cause, e.g. "
                              f"{credit_wrong[:3]}")

    checks["due_actions"] = True
    twice = [i for i, k in due_count.items() if k > 1]
    missing = [f for f, sk in pairs if f not in due_count and sk not in due_count]
    both = [f for f, sk in pairs if f in due_count and sk in due_count]
    extra = [i for i in due_count if i not in expected_dues]
    if twice:
        bad("due_actions", f"{len(twice)} soakdue actions landed more than once, e.g. "
                           f"{[(i, due_count[i], expected_dues.get(i)) for i in twice[:5]]}")
    if missing:
        bad("due_actions", f"{len(missing)} tasks' timers neither fired nor skipped (user, task, timer), e.g. "
                           f"{[expected_dues[i] for i in missing[:5]]}")
    if both:
        bad("due_actions", f"{len(both)} tasks' timers both fired and skipped, e.g. "
                           f"{[expected_dues[i] for i in both[:5]]}")
    if extra:
        bad("due_actions", f"{len(extra)} unexpected soakdue actions, e.g. {extra[:5]}")
    if due_wrong:
        bad("due_actions", f"{len(due_wrong)} soakdue actions with the wrong user/of/cause, e.g. {due_wrong[:3]}")
    lateness.sort()
    info["live_timer_lateness_ms"] = {"n": len(lateness), "p50": round(percentile(lateness, 0.5)),
                                      "p99": round(percentile(lateness, 0.99)),
                                      "max": round(lateness[-1]) if lateness else 0}

    # 4. caps and budget
    per_day = Counter((a["user"], a["params"].get("day")) for a in chances)
    over = {k: v for k, v in per_day.items() if v > model.cap}
    checks["daily_cap"] = not over
    if over:
        problems.append(f"daily_cap: {len(over)} user-days over the cap of {model.cap}, e.g. {list(over.items())[:5]}")
    info["max_chances_per_user_day"] = max(per_day.values(), default=0)

    checks["cash"] = True
    cc = Counter(a["id"] for a in cash)
    if any(k > 1 for k in cc.values()):
        bad("cash", f"{sum(k > 1 for k in cc.values())} cash actions landed more than once")
    by_user = {u.name: u for u in users + stream_users}  # the stream users earn cash too
    spent = 0
    for a in cash:
        amount = a["params"].get("amount_cents")
        spent += int(amount or 0)
        try:
            ui, n = parse_eid(a["cause"])
            u = by_user[a["user"]]
            ok = (u.index == ui and n <= u.n and u.task_flags[n] == 1
                  and a["id"] == action_id(CAMPAIGN, a["user"], a["cause"], "reward", 1)
                  and amount == SoakUser.cents(ui, n))
        except (KeyError, ValueError, IndexError):
            ok = False
        if not ok:
            bad("cash", f"cash action {a['id']} does not match a task event of ours: {a}")
    info.update(cash_spent=spent, budget=model.budget, budget_remaining_in_redis=remaining,
                budget_stranded=model.budget - spent - remaining)
    checks["budget"] = spent <= model.budget and spent + remaining <= model.budget
    if not checks["budget"]:
        problems.append(f"budget: spent {spent} + {remaining} left in Redis, total {model.budget}")

    # 5. webhook actions: every bonus reached the receiver at least once, with its id as Idempotency-Key
    received = receiver.received()
    checks["webhook_at_least_once"] = receiver.keys_ok
    missing = [i for i in model.bonuses if i not in received]
    if missing:
        bad("webhook_at_least_once", f"{len(missing)} bonus actions never reached the webhook, e.g. {missing[:5]}")
    unknown = [i for i in received if i not in model.bonuses]
    if unknown:
        bad("webhook_at_least_once", f"{len(unknown)} unknown actions reached the webhook, e.g. {unknown[:5]}")
    info.update(bonus_actions=len(received), bonus_calls=sum(received.values()))

    # 6. answered actions landed; a resend is a duplicate
    landed = ({a["id"] for a in milestones} | {a["id"] for a in chances} | {a["id"] for a in cash}
              | set(received) | set(due_count) | set(credit_count))
    lost = [i for i in prog.answered_actions if i not in landed]
    checks["answered_actions_landed"] = not lost
    if lost:
        problems.append(f"answered_actions_landed: {len(lost)} actions answered `applied` but not in their "
                        f"stream, e.g. {[(i, prog.answered_actions[i]) for i in lost[:5]]}")
    info["answered_actions"] = len(prog.answered_actions)
    checks["resend_is_duplicate"] = bool(resent) and set(resent) == {"duplicate"}
    if not checks["resend_is_duplicate"]:
        problems.append(f"resend_is_duplicate: the last chunks resent were answered {dict(Counter(resent))}")
    checks["gameplay_credit_rejected"] = forged == "rejected"
    if forged != "rejected":
        problems.append(f"gameplay_credit_rejected: a soak.credit posted by a gameplay was answered {forged}")
    return checks, problems, info


def settle(cluster: ClusterProcess, model: Model, receiver: Receiver, timers: int, deadline: float,
           log: Any) -> None:
    """Wait until playbus:in is consumed, every expected bonus reached the webhook and each of the `timers` tasks has
    its soakdue action (fired or skipped) and its soakcredit action (its send decided), or the deadline. The last
    timers come due `timer_ms` after the last event."""
    import redis

    from playbus.actors.store.connect import connect

    r = connect(cluster.redis_url, socket_timeout=10)
    try:
        while time.monotonic() < deadline:
            try:
                left = r.xlen("playbus:in")
                fired = r.xlen(DUES)
                credited = r.xlen(CREDITS)
            except redis.RedisError:
                left = fired = credited = -1
            missing = sum(1 for i in model.bonuses if i not in receiver.calls)
            if left == 0 and missing == 0 and fired >= timers and credited >= timers:
                return
            time.sleep(1.0)
        log(f"  not settled in time: {left} stream entries left, {missing} bonus actions not delivered, {fired} of "
            f"{timers} timers fired or skipped, {credited} of {timers} sends decided")
    finally:
        r.close()


def post_forged_credit(url: str, user: str) -> str:
    """A soak.credit posted by a gameplay: only rules make that type (the link rule sends it), so `rejected`."""
    client = TimedClient(url, LatencyRecorder(), max_batch=1, linger_ms=0, max_retries=8, timeout_s=60)
    try:
        ev = {"id": f"forged-credit-{user}", "campaign": CAMPAIGN, "user": user, "type": "soak.credit",
              "ts": int(time.time() * 1000), "data": {"from": "a gameplay"}}
        return str(client.send_many([ev], timeout=120)[0].get("status", "?"))
    except Exception as e:  # noqa: BLE001 - reported as the check's failure
        return f"{type(e).__name__}: {e}"
    finally:
        client.close(30)


# -- main --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="playbus soak: load + every kind of fault against its own cluster, "
                                            "checked against a reference model.")
    p.add_argument("--minutes", type=float, default=5.0, help="minutes of load (default: %(default)s)")
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--producers", type=int, default=4, help="producer threads, one PlaybusClient each")
    p.add_argument("--chunk", type=int, default=200, help="events per request (default: %(default)s)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--every", type=int, default=10, help="a milestone action every Nth event of a user")
    p.add_argument("--bonus", type=int, default=7, help="a webhook bonus action every Bth event of a user")
    p.add_argument("--stream-users", type=int, default=40, help="users whose events go through playbus:in")
    p.add_argument("--cap", type=int, default=3, help="lottery chances per user per day")
    p.add_argument("--timer-ms", type=int, default=1500, help="a task's timer comes due this long after its ts")
    p.add_argument("--budget", type=int,
                   help="cash budget in cents (default: 7,000,000 per minute of load: at the ~8,000 events/s "
                        "of a 2-core machine it runs out about halfway, so that kills hit shards holding leases)")
    p.add_argument("--fault-every", type=float, nargs=2, default=(15.0, 25.0), metavar=("MIN_S", "MAX_S"))
    p.add_argument("--stall-ms", type=int, default=3000, help="the redis_stall fault's CLIENT PAUSE")
    p.add_argument("--seed", type=int, help="default: from the clock (printed)")
    p.add_argument("--progress", type=float, default=10.0)
    p.add_argument("--cluster-log", action="store_true", help="echo run_cluster.py's output")
    p.add_argument("--keep", metavar="DIR", help="keep the embedded Redis's data in DIR/redis and run_cluster.py's "
                                                 "output in DIR/cluster.log, for a post-mortem")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    if args.budget is None:
        args.budget = int(args.minutes * 7_000_000)
    t_begin = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_begin:7.1f}s] {msg}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="playbus-soak-"))
    receiver = Receiver(seed)
    config = write_config(tmp, args.shards, args.every, args.bonus, args.cap, args.budget, receiver.url,
                          args.timer_ms)
    echo = (lambda line: print(f"  | {line}", flush=True)) if args.cluster_log else None
    keep = Path(args.keep).resolve() if args.keep else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    cluster = ClusterProcess(config, echo=echo, env={"PLAYBUS_ADMIN_TOKEN": ADMIN_TOKEN},
                             redis_dir=keep / "redis" if keep is not None else None)
    log(f"soak: {args.minutes:g} min, {args.users} users, {args.producers} producers x {args.chunk} events per "
        f"request, {args.shards} shards, seed {seed}; config {config}")
    cluster.start()
    log(f"cluster up at {cluster.url}, redis {cluster.redis_url}")
    shard_pids = cluster.processes(SHARD_TITLE)
    log(f"shard worker processes: {shard_pids}")

    model = Model(args.every, args.bonus, args.cap, args.budget, args.timer_ms)
    start_ms = int(time.time() * 1000)
    users = [SoakUser(i, seed, start_ms) for i in range(args.users)]
    stream_users = [SoakUser(args.users + i, seed, start_ms) for i in range(args.stream_users)]
    for group in (users, stream_users):  # partners: HTTP users of HTTP users, stream users of stream users
        for u in group:
            u.pool = group
    prog = Progress()
    recorder = LatencyRecorder()
    stop = threading.Event()
    start = time.monotonic()
    end = start + args.minutes * 60
    hard_deadline = end + 180
    producers = [Producer(i, cluster.url, users[i::args.producers], model, prog, args.chunk, stop, hard_deadline,
                          recorder, seed) for i in range(args.producers)]
    faults = Faults(cluster, args.shards, stop, start, end, tuple(args.fault_every), args.stall_ms, users, model,
                    seed, log)
    streamer = StreamProducerThread(cluster.redis_url, stream_users, model, stop, prog, seed)
    hostile = HostileProducer(cluster.url, stop, seed)
    checks: dict[str, bool] = {}
    problems: list[str] = []
    info: dict[str, Any] = {}
    sending_s = 0.0
    longest_stall = 0.0
    rep = StopReport()
    try:
        for pr in producers:
            pr.start()
        if stream_users:
            streamer.start()
        hostile.start()
        faults.start()
        last_t, last_answered = start, 0
        last_progress = start  # when the answered count last grew
        while time.monotonic() < end:
            time.sleep(max(0.05, min(args.progress, end - time.monotonic())))
            now = time.monotonic()
            with prog.lock:
                sent, answered, fails = prog.sent, prog.answered, sum(prog.chunk_failures.values())
                resends, dup = prog.resent_chunks, prog.statuses["duplicate"]
            req = recorder.summary(recorder.cut())
            log(f"sent {sent:,} answered {answered:,} ({(answered - last_answered) / (now - last_t):,.0f} events/s"
                f" now, {answered / (now - start):,.0f} avg) | requests p50 {req['p50']:.0f} p99 {req['p99']:.0f}"
                f" ms | duplicates {dup} | failed attempts {fails}, resent chunks {resends} | faults "
                f"{len(faults.done)}")
            if answered > last_answered:
                last_progress = now
            longest_stall = max(longest_stall, now - last_progress)
            last_t, last_answered = now, answered
        log("load time is up: stopping the producers (each finishes its chunk in flight)")
        stop.set()
        for pr in producers:
            pr.join(hard_deadline - time.monotonic() + 30)
        sending_s = time.monotonic() - start
        streamer.join(60)
        hostile.join(130)
        faults.join(100)
        timers = sum(u.tasks for u in users + stream_users)
        log(f"waiting for the stream input to be consumed, the webhook actions to be delivered and {timers:,} "
            f"timers to fire ...")
        settle(cluster, model, receiver, timers, time.monotonic() + 180, log)
        alive = [pr.name for pr in producers if pr.is_alive()]
        if alive:
            prog.gave_up.append(f"producers still running: {alive}")
        log("resending the last chunk of every producer (expect all duplicate)")
        resent = [s for pr in producers for s in pr.resend_last()]
        forged = post_forged_credit(cluster.url, users[0].name)
        log(f"a soak.credit from a gameplay was answered {forged}")
        log(f"verifying {sum(u.n for u in users):,} events of {len(users)} users against the model ...")
        checks, problems, info = verify(cluster, users, stream_users, model, prog, resent, receiver, forged)
        info["hostile_answers"] = dict(hostile.answered)
        info["stream_events"] = streamer.sent
    except Exception as e:  # noqa: BLE001 - any crash of the soak itself is a FAIL with its reason
        stop.set()
        checks["soak_ran"] = False
        problems.append(f"soak_ran: {type(e).__name__}: {e}")
    finally:
        stop.set()
        log("stopping the cluster (SIGTERM)")
        rep = cluster.stop()
        receiver.close()
        if keep is not None:
            (keep / "cluster.log").write_text("\n".join(cluster.lines) + "\n", encoding="utf-8")
            log(f"kept the Redis data in {keep / 'redis'} and run_cluster.py's output in {keep / 'cluster.log'}")
        with contextlib.suppress(OSError):
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    checks["clean_stop"] = rep.ok
    checks["no_stall_over_60s"] = longest_stall <= MAX_STALL_S
    if not checks["no_stall_over_60s"]:
        problems.append(f"no_stall_over_60s: no event was answered for {longest_stall:.0f} s")
    if not checks["clean_stop"]:
        problems.append(f"clean_stop: {rep.as_dict()}; output tail:\n{cluster.output(30)}")
    if faults.problems:
        problems.append(f"faults: {faults.problems}")
    kinds_done = {f["kind"] for f in faults.done}
    long_enough = args.minutes * 60 >= len(FAULT_KINDS) * args.fault_every[1] + 20
    checks["every_fault_kind"] = kinds_done == set(FAULT_KINDS) or (not long_enough and bool(faults.done))
    if not checks["every_fault_kind"]:
        problems.append(f"every_fault_kind: injected {sorted(kinds_done)} of {list(FAULT_KINDS)}")

    total = sum(u.n for u in users) + sum(u.n for u in stream_users)
    req = recorder.summary()
    chunk = sorted(prog.chunk_ms)
    summary = {
        "result": "PASS" if checks and all(checks.values()) else "FAIL",
        "seed": seed, "minutes": args.minutes, "users": args.users, "producers": args.producers,
        "shards": args.shards, "events": total, "sending_s": round(sending_s, 1),
        "events_per_s": round(total / sending_s, 1) if sending_s else 0.0,
        "longest_stall_s": round(longest_stall, 1),
        "faults": faults.done, "fault_count": len(faults.done),
        "request_latency_ms": {k: round(v, 1) for k, v in req.items() if k != "n"}, "requests": req["n"],
        "request_outcomes": dict(recorder.outcomes),
        "chunk_latency_ms": {"p50": round(percentile(chunk, 0.5), 1), "p99": round(percentile(chunk, 0.99), 1)},
        "failed_attempts": dict(prog.chunk_failures), "resent_chunks": prog.resent_chunks,
        "client_retries": sum(pr.client.retries for pr in producers),
        "last_cash_grant_at_s": round(prog.last_cash_t - start, 1) if prog.last_cash_t else None,
        "checks": checks, "problems": problems, **info,
    }
    print("\n==== soak summary ====", flush=True)
    print(f"events: {total:,} in {sending_s:.1f} s -> {summary['events_per_s']:,.0f} events/s; requests "
          f"{req['n']:,}: p50 {req['p50']:.1f} ms p95 {req['p95']:.1f} ms p99 {req['p99']:.1f} ms max "
          f"{req['max']:.1f} ms", flush=True)
    done = ", ".join(f"{f['kind']}@{f['at_s']}s" for f in faults.done) or "none"
    print(f"faults injected: {len(faults.done)} ({done}); failed request attempts "
          f"{dict(recorder.outcomes)}; resent chunks {prog.resent_chunks}", flush=True)
    print(f"final answers: {info.get('final_answers')}; actions: {info.get('milestone_actions')} milestones, "
          f"{info.get('lottery_actions')} lottery chances (max {info.get('max_chances_per_user_day')} per user-day,"
          f" cap {args.cap}), {info.get('cash_actions')} cash grants = {info.get('cash_spent')} of "
          f"{args.budget} cents ({info.get('budget_remaining_in_redis')} left in Redis, "
          f"{info.get('budget_stranded')} in shard leases, lost with killed shards or unspent; last grant at "
          f"{summary['last_cash_grant_at_s']} s)", flush=True)
    late = info.get("live_timer_lateness_ms") or {}
    print(f"sends and timers: {info.get('credits_expected')} credits sent, {info.get('timers_expected')} task timers: "
          f"{info.get('timers_fired')} fired, {info.get('timers_skipped')} skipped (at {MAX_PENDING} pending); live "
          f"timers ({late.get('n')}) fired p50 {late.get('p50')} ms, p99 {late.get('p99')} ms, max {late.get('max')} "
          f"ms after their due time", flush=True)
    print("\n  fault kind       injected  recovered after (s)", flush=True)
    for kind in FAULT_KINDS:
        of_kind = [f for f in faults.done if f["kind"] == kind]
        recovered = [str(f["recovered_s"]) for f in of_kind if "recovered_s" in f]
        print(f"  {kind:<16} {len(of_kind):>8}  {', '.join(recovered) or '-'}", flush=True)
    print("\n  invariant                   held", flush=True)
    for name, ok in checks.items():
        print(f"  {name:<27} {'yes' if ok else 'NO'}", flush=True)
    lost = info.get("final_answers", {}).get("unanswered", 0)
    exact = all(checks.get(k, False) for k in ("milestones", "lottery", "credit_actions", "due_actions"))
    print(f"\n  events {total:,}, faults {len(faults.done)}, lost {lost}, doubled {0 if exact else 'see problems'}\n",
          flush=True)
    for prob in problems:
        print(f"  problem: {prob}", flush=True)
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    print(f"soak: {summary['result']}", flush=True)
    return 0 if summary["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
