"""Soak: a long fault run against a real cluster, checked against a reference model (`make soak`).

    python -m playbus.loadtest.soak [--minutes 5] [--users 400] [--producers 4] [--shards 2] [--seed N]

Starts its own cluster (run_cluster.py as a subprocess, embedded Redis in a temp dir) with a small test
config written to a temp dir, then runs producers through PlaybusClient for `--minutes`, every event with a
unique id, and every 20-40 s injects a fault:

  * SIGKILL of a random shard worker process (`ray::_UserActivityActor`, a descendant of our run_cluster.py);
    Ray restarts the actor and the ingress retries its calls;
  * once, a Redis stall: `CLIENT PAUSE <ms> ALL` on the embedded Redis (every client, the shards' commits
    included, blocks for that long). The embedded redis-server is owned by run_cluster.py (it started it and
    stops it), so the soak does NOT kill it: a restarted Redis on another port would not be found again.
    Redis crashes with AOF are covered by tests/integration/test_cluster.py instead.
  * optionally (`--ingress-kills`), SIGKILL of the Serve ingress replica.

The test campaign ("soak"): every event `soak.tick` runs two rules, in order:
  count   ctx.soak.count += 1; every Nth event (`--every`) emits soak.milestone {n} (stream target)
  reward  for a task event (data.task): ctx.soak.tasks += 1; emits lottery.grant_chance {day} (capped per user
          per day, `--cap`) and wallet.grant_cash {amount_cents} (from a campaign-wide budget, `--budget`);
          both targets are Redis streams here, so everything can be read back.

Each user belongs to one producer, which sends a chunk of events as one request and waits for it (resending
the same chunk, same ids, until answered): a user's events are applied in the order they were made, so the
model knows which event is each user's Nth and which tasks are each day's first `cap`. At the end:

  1. every event sent got exactly one final answer, applied or duplicate (none lost, none rejected, none failed);
  2. per user, soak.count and soak.tasks in the committed context (GET .../context) equal the distinct events
     and task events sent;
  3. every expected milestone and lottery action id is in its target stream exactly once, nothing else is;
     each milestone's params.n is the position the model expects (a doubly applied event would shift it);
  4. no user got more than `cap` lottery chances on any day; cash actions are unique, each caused by a task
     event of ours with the right id and amount, and together never exceed the budget (nor, with what the
     Redis budget counter still holds, the total);
  5. every action answered in an `applied` result is in its stream; the last chunk of every producer, resent,
     is all `duplicate`; run_cluster.py stops cleanly on SIGTERM.

Prints progress every ~10 s and a summary; exit code 0 only on PASS.
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
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from playbus.actors.engine.clock import CampaignClock
from playbus.actors.engine.keys import action_id
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
SHARD_TITLE = "ray::_UserActivityActor"
INGRESS_TITLE = "ray::ServeReplica:playbus:Ingress"

COUNT_LUA = """\
-- Every event counts; every {every}th event of a user emits a milestone (a stream-target action).
function decide(event, ctx)
  local n = ctx:incr("soak.count", 1)
  if n % {every} == 0 then emit("soak.milestone", {{n = n}}) end
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
campaigns:
  - id: {campaign}
    timezone: {tz}
    starts: {starts}
    ends: {ends}
    rules:
      - {{id: count, on: soak.tick, script: count.lua, emits: [soak.milestone]}}
      - {{id: reward, on: soak.tick, script: reward.lua, emits: [lottery.grant_chance, wallet.grant_cash]}}
    caps:
      - {{action: lottery.grant_chance, per_user: {cap}, period: day}}
    budgets:
      - {{name: cash, action: wallet.grant_cash, param: amount_cents, total: {budget}}}
"""

STATUS = {"applied": 1, "duplicate": 2, "rejected": 3}
STATUS_NAME = {0: "unanswered", 1: "applied", 2: "duplicate", 3: "rejected", 4: "other"}


def write_config(base: Path, shards: int, every: int, cap: int, budget: int) -> Path:
    (base / "count.lua").write_text(COUNT_LUA.format(every=every), encoding="utf-8")
    (base / "reward.lua").write_text(REWARD_LUA, encoding="utf-8")
    path = base / "soak.yaml"
    path.write_text(CONFIG_YAML.format(shards=shards, milestones=MILESTONES, lottery=LOTTERY, wallet=WALLET,
                                       campaign=CAMPAIGN, tz=TZ, starts=STARTS, ends=ENDS, cap=cap, budget=budget),
                    encoding="utf-8")
    return path


# -- the reference model -----------------------------------------------------------------------------------
class SoakUser:
    """One user's events, made in order by its producer, and what the model expects of them."""

    __slots__ = ("index", "name", "rng", "clock", "n", "tasks", "task_flags", "answers", "status",
                 "day", "day_tasks")

    def __init__(self, index: int, seed: int) -> None:
        self.index = index
        self.name = f"s{seed}-u{index}"
        self.rng = random.Random(f"soak/{seed}/{index}")
        self.clock = T0 + self.rng.randrange(6 * 3_600_000)
        self.n = 0  # events made so far (the id of the next is n + 1)
        self.tasks = 0
        self.task_flags = bytearray(b"\0")  # [n] = 1 for a task event (index 0 unused)
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
        self.clock += self.rng.randrange(10 * 60_000, 60 * 60_000)
        self.n += 1
        n, eid = self.n, self.event_id(self.n)
        is_task = self.rng.random() < 0.4
        self.task_flags.append(1 if is_task else 0)
        self.answers.append(0)
        self.status.append(0)
        ev: dict[str, Any] = {"id": eid, "campaign": CAMPAIGN, "user": self.name, "type": "soak.tick",
                              "ts": self.clock}
        if n % model.every == 0:
            model.milestones[action_id(CAMPAIGN, self.name, eid, "count", 0)] = (self.name, n)
        if is_task:
            self.tasks += 1
            ev["data"] = {"task": True, "cents": self.cents(self.index, n)}
            day = model.clock.day(self.clock)
            if day != self.day:
                self.day, self.day_tasks = day, 0
            if self.day_tasks < model.cap:
                self.day_tasks += 1
                model.chances[action_id(CAMPAIGN, self.name, eid, "reward", 0)] = (self.name, day)
        else:
            ev["data"] = {"task": False}
        return ev


@dataclass
class Model:
    every: int
    cap: int
    budget: int
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


# -- faults ------------------------------------------------------------------------------------------------
class Faults(threading.Thread):
    def __init__(self, cluster: ClusterProcess, shards: int, stop: threading.Event, start: float, end: float,
                 every: tuple[float, float], stall_ms: int, ingress_kills: bool, seed: int,
                 log: Any) -> None:
        super().__init__(name="soak-faults", daemon=True)
        self.cluster = cluster
        self.shards = shards
        self.stop_flag = stop
        self.start_t = start
        self.end_t = end
        self.every = every
        self.stall_ms = stall_ms
        self.ingress_kills = ingress_kills
        self.rng = random.Random(f"soak-faults/{seed}")
        self.log = log
        self.done: list[dict[str, Any]] = []
        self.problems: list[str] = []

    def run(self) -> None:
        kinds = ["kill_shard"]
        stall_at = self.start_t + (self.end_t - self.start_t) * 0.45 if self.stall_ms > 0 else None
        t = self.start_t + self.rng.uniform(*self.every)
        n = 0
        while True:
            if stall_at is not None and stall_at < t:
                wait_until, kind = stall_at, "redis_stall"
            else:
                wait_until = t
                kind = "kill_ingress" if self.ingress_kills and n % 3 == 2 else kinds[0]
            if wait_until >= self.end_t - 5:
                return
            if self.stop_flag.wait(max(0.0, wait_until - time.monotonic())):
                return
            try:
                if kind == "redis_stall":
                    stall_at = None
                    self._redis_stall()
                else:
                    n += 1
                    t = time.monotonic() + self.rng.uniform(*self.every)
                    self._kill(SHARD_TITLE if kind == "kill_shard" else INGRESS_TITLE, kind)
            except Exception as e:  # noqa: BLE001 - a fault that could not be injected is reported
                self.problems.append(f"{kind}: {type(e).__name__}: {e}")
                self.log(f"fault {kind} could not be injected: {type(e).__name__}: {e}")

    def _kill(self, title: str, kind: str) -> None:
        pids = self.cluster.processes(title)
        if not pids:
            self.problems.append(f"{kind}: no process titled {title!r} found among run_cluster's processes")
            self.log(f"fault {kind}: no {title} process found")
            return
        if kind == "kill_shard" and len(pids) != self.shards:
            self.log(f"note: {len(pids)} shard worker processes found, {self.shards} expected: {pids}")
        pid = self.rng.choice(pids)
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rec: dict[str, Any] = {"kind": kind, "pid": pid, "at_s": round(t - self.start_t, 1)}
        self.done.append(rec)
        self.log(f"FAULT {len(self.done)}: SIGKILL {title} pid {pid}")
        # Wait (at most 60 s) for the replacement worker.
        while time.monotonic() - t < 60 and not self.stop_flag.is_set():
            now = set(self.cluster.processes(title))
            new = now - set(pids)
            if new and pid not in now:
                rec["replaced_by"] = sorted(new)
                rec["restart_s"] = round(time.monotonic() - t, 1)
                self.log(f"  {title} back as pid {sorted(new)} after {rec['restart_s']} s")
                return
            time.sleep(0.25)
        self.log(f"  no replacement {title} process seen within 60 s (Ray may restart it lazily)")

    def _redis_stall(self) -> None:
        import redis

        r = redis.Redis.from_url(self.cluster.redis_url, socket_timeout=10)
        try:
            r.execute_command("CLIENT", "PAUSE", str(self.stall_ms), "ALL")  # type: ignore[no-untyped-call]
        finally:
            r.close()
        rec = {"kind": "redis_stall", "ms": self.stall_ms, "at_s": round(time.monotonic() - self.start_t, 1)}
        self.done.append(rec)
        self.log(f"FAULT {len(self.done)}: Redis stalled with CLIENT PAUSE {self.stall_ms} ALL")


# -- verification ------------------------------------------------------------------------------------------
def read_stream(client: Any, stream: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    start = "-"
    while True:
        page = client.xrange(stream, min=start, max="+", count=5000)
        if not page:
            return out
        out += [json.loads(f[b"action"]) for _, f in page]
        last = page[-1][0].decode()
        ms, seq = last.split("-")
        start = f"{ms}-{int(seq) + 1}"


def get_context(cluster: ClusterProcess, user: str) -> dict[str, Any]:
    for attempt in range(10):
        try:
            st, body = http_get(cluster.host, cluster.port,
                                 f"/v1/campaigns/{quote(CAMPAIGN, safe='')}/users/{quote(user, safe='')}/context", 30)
            if st == 200:
                return json.loads(body)["context"]  # type: ignore[no-any-return]
        except OSError:
            pass
        time.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"GET context of {user} failed 10 times")


def verify(cluster: ClusterProcess, users: list[SoakUser], model: Model, prog: Progress,
           resent: list[str]) -> tuple[dict[str, bool], list[str], dict[str, Any]]:
    import redis

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

    # 2. committed contexts
    checks["contexts"] = True
    for u in users:
        if u.n == 0:
            continue
        ctx = get_context(cluster, u.name)
        if ctx.get("soak.count") != u.n or ctx.get("soak.tasks", 0) != u.tasks:
            bad("contexts", f"{u.name}: context {ctx} but {u.n} events and {u.tasks} tasks were sent")

    r = redis.Redis.from_url(cluster.redis_url, socket_timeout=60)
    try:
        milestones = read_stream(r, MILESTONES)
        chances = read_stream(r, LOTTERY)
        cash = read_stream(r, WALLET)
        remaining = int(r.get(budget_key(CAMPAIGN, "cash")) or 0)
    finally:
        r.close()
    info.update(milestone_actions=len(milestones), lottery_actions=len(chances), cash_actions=len(cash))

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
    by_user = {u.name: u for u in users}
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

    # 5. answered actions landed; a resend is a duplicate
    landed = {a["id"] for a in milestones} | {a["id"] for a in chances} | {a["id"] for a in cash}
    lost = [i for i in prog.answered_actions if i not in landed]
    checks["answered_actions_landed"] = not lost
    if lost:
        problems.append(f"answered_actions_landed: {len(lost)} actions answered `applied` but not in their "
                        f"stream, e.g. {[(i, prog.answered_actions[i]) for i in lost[:5]]}")
    info["answered_actions"] = len(prog.answered_actions)
    checks["resend_is_duplicate"] = bool(resent) and set(resent) == {"duplicate"}
    if not checks["resend_is_duplicate"]:
        problems.append(f"resend_is_duplicate: the last chunks resent were answered {dict(Counter(resent))}")
    return checks, problems, info


# -- main --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="playbus soak: load + faults (kill -9 of shard workers, a Redis "
                                            "stall) against its own cluster, checked against a reference model.")
    p.add_argument("--minutes", type=float, default=5.0, help="minutes of load (default: %(default)s)")
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--producers", type=int, default=4, help="producer threads, one PlaybusClient each")
    p.add_argument("--chunk", type=int, default=200, help="events per request (default: %(default)s)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--every", type=int, default=10, help="a milestone action every Nth event of a user")
    p.add_argument("--cap", type=int, default=3, help="lottery chances per user per day")
    p.add_argument("--budget", type=int,
                   help="cash budget in cents (default: 7,000,000 per minute of load: at the ~8,000 events/s "
                        "of a 2-core machine it runs out about halfway, so that kills hit shards holding leases)")
    p.add_argument("--fault-every", type=float, nargs=2, default=(20.0, 40.0), metavar=("MIN_S", "MAX_S"))
    p.add_argument("--stall-ms", type=int, default=3000, help="Redis CLIENT PAUSE, once (0: none)")
    p.add_argument("--ingress-kills", action="store_true", help="every third fault kills the ingress replica")
    p.add_argument("--seed", type=int, help="default: from the clock (printed)")
    p.add_argument("--progress", type=float, default=10.0)
    p.add_argument("--cluster-log", action="store_true", help="echo run_cluster.py's output")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    if args.budget is None:
        args.budget = int(args.minutes * 7_000_000)
    t_begin = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_begin:7.1f}s] {msg}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="playbus-soak-"))
    config = write_config(tmp, args.shards, args.every, args.cap, args.budget)
    echo = (lambda line: print(f"  | {line}", flush=True)) if args.cluster_log else None
    cluster = ClusterProcess(config, echo=echo)
    log(f"soak: {args.minutes:g} min, {args.users} users, {args.producers} producers x {args.chunk} events per "
        f"request, {args.shards} shards, seed {seed}; config {config}")
    cluster.start()
    log(f"cluster up at {cluster.url}, redis {cluster.redis_url}")
    shard_pids = cluster.processes(SHARD_TITLE)
    log(f"shard worker processes: {shard_pids}")

    model = Model(args.every, args.cap, args.budget)
    users = [SoakUser(i, seed) for i in range(args.users)]
    prog = Progress()
    recorder = LatencyRecorder()
    stop = threading.Event()
    start = time.monotonic()
    end = start + args.minutes * 60
    hard_deadline = end + 180
    producers = [Producer(i, cluster.url, users[i::args.producers], model, prog, args.chunk, stop, hard_deadline,
                          recorder, seed) for i in range(args.producers)]
    faults = Faults(cluster, args.shards, stop, start, end, tuple(args.fault_every), args.stall_ms,
                    args.ingress_kills, seed, log)
    checks: dict[str, bool] = {}
    problems: list[str] = []
    info: dict[str, Any] = {}
    sending_s = 0.0
    rep = StopReport()
    try:
        for pr in producers:
            pr.start()
        faults.start()
        last_t, last_answered = start, 0
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
            last_t, last_answered = now, answered
        log("load time is up: stopping the producers (each finishes its chunk in flight)")
        stop.set()
        for pr in producers:
            pr.join(hard_deadline - time.monotonic() + 30)
        sending_s = time.monotonic() - start
        faults.join(70)
        alive = [pr.name for pr in producers if pr.is_alive()]
        if alive:
            prog.gave_up.append(f"producers still running: {alive}")
        log("resending the last chunk of every producer (expect all duplicate)")
        resent = [s for pr in producers for s in pr.resend_last()]
        log(f"verifying {sum(u.n for u in users):,} events of {len(users)} users against the model ...")
        checks, problems, info = verify(cluster, users, model, prog, resent)
    except Exception as e:  # noqa: BLE001 - any crash of the soak itself is a FAIL with its reason
        stop.set()
        checks["soak_ran"] = False
        problems.append(f"soak_ran: {type(e).__name__}: {e}")
    finally:
        stop.set()
        log("stopping the cluster (SIGTERM)")
        rep = cluster.stop()
        with contextlib.suppress(OSError):
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    checks["clean_stop"] = rep.ok
    if not checks["clean_stop"]:
        problems.append(f"clean_stop: {rep.as_dict()}; output tail:\n{cluster.output(30)}")
    if faults.problems:
        problems.append(f"faults: {faults.problems}")
    kills = [f for f in faults.done if f["kind"] != "redis_stall"]
    checks["faults_injected"] = bool(kills) or args.minutes * 60 < args.fault_every[0] + 5
    if not checks["faults_injected"]:
        problems.append("faults_injected: no shard worker could be killed")

    total = sum(u.n for u in users)
    req = recorder.summary()
    chunk = sorted(prog.chunk_ms)
    summary = {
        "result": "PASS" if checks and all(checks.values()) else "FAIL",
        "seed": seed, "minutes": args.minutes, "users": args.users, "producers": args.producers,
        "shards": args.shards, "events": total, "sending_s": round(sending_s, 1),
        "events_per_s": round(total / sending_s, 1) if sending_s else 0.0,
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
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}", flush=True)
    for prob in problems:
        print(f"  problem: {prob}", flush=True)
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    print(f"soak: {summary['result']}", flush=True)
    return 0 if summary["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
