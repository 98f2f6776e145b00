"""A small locust-style load harness for playbus (no locust dependency).

    python -m playbus.loadtest.harness --url http://127.0.0.1:8000 --users 200 --duration 30
    python -m playbus.loadtest.harness --start-cluster --users 50 --duration 20
    python -m playbus.loadtest.harness --url ... --users 200 --events 100000 --rate 2000 --seed 7

Virtual users are instances of `Behaviour` subclasses; each subclass has `@task(weight)` methods that
produce the events of one gameplay for that user, matching the rules of config/example.yaml and the event
shapes of config/example-events.jsonl:

    QuizPlayer   quiz.answered       {question, correct}
    TaskDoer     task.completed      {task, tier 1|2|3}
    CheckinUser  checkin.checked_in  (about one a day; sometimes twice a day, sometimes a missed day)
    Inviter      assist.helped       {helper, chain}  (user = the inviter, as the assist rule expects)
    TeamMember   team.formed         {team, role}  then  team.completed {team}

Everything a virtual user does is deterministic for a seed: its event ids (unique: "<prefix>-<kind><n>-<seq>"),
its user ids, its data, and its timestamps, which follow a simulated clock that only moves forward inside the
campaign window (a user whose clock reaches the end of the campaign comes back as a new user, "~<generation>").

`Runner` drives N virtual users through `playbus.client.PlaybusClient`: `clients` producer threads, each with
its own client (its own batching sender thread and connection) and a share of the users, with at most
`max_in_flight` unanswered events per client. It reports events/s, the latency of every HTTP request the
clients make (p50/p95/p99; timed around `PlaybusClient._post_once` by a subclass, the client is not changed)
and of every event (send() to result), counts by result status, errors, rule errors and per-gameplay counts.

With `--start-cluster` it starts its own `run_cluster.py` with `loadtest.launcher.ClusterProcess` (as
loadtest/soak.py and tests/e2e/conftest.py do), and stops it with SIGTERM, checking that it stopped cleanly.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar, overload

from playbus.client import PlaybusClient
from playbus.loadtest.launcher import ClusterProcess
from playbus.loadtest.stats import percentile

__all__ = [
    "BEHAVIOURS",
    "SPRING2026",
    "Behaviour",
    "CampaignWindow",
    "CheckinUser",
    "Inviter",
    "LatencyRecorder",
    "QuizPlayer",
    "RateLimiter",
    "Runner",
    "TaskDoer",
    "TeamMember",
    "TimedClient",
    "make_users",
    "task",
]

ROOT = Path(__file__).resolve().parents[1]
MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000

F = TypeVar("F", bound=Callable[..., Any])


# -- the campaign a behaviour plays in ---------------------------------------------------------------------
@dataclass(frozen=True)
class CampaignWindow:
    """The campaign id and its window [starts_ms, ends_ms) (events outside it run no rule)."""

    id: str
    starts_ms: int
    ends_ms: int

    @classmethod
    def from_config(cls, path: str | Path, campaign: str | None = None) -> CampaignWindow:
        from playbus.config import load_config

        cfg = load_config(path)
        for c in cfg.campaigns:
            if campaign is None or c.id == campaign:
                return cls(c.id, c.starts_ms, c.ends_ms)
        raise ValueError(f"{path}: no campaign {campaign!r}")


# config/example.yaml: spring2026, 2026-01-20T00:00:00+08:00 .. 2026-02-20T00:00:00+08:00
SPRING2026 = CampaignWindow("spring2026", 1_768_838_400_000, 1_771_516_800_000)


# -- behaviours --------------------------------------------------------------------------------------------
@overload
def task(weight: F) -> F: ...


@overload
def task(weight: int = 1) -> Callable[[F], F]: ...


def task(weight: int | F = 1) -> Any:
    """Mark a Behaviour method as a task picked with relative `weight` (`@task` alone means weight 1)."""
    if callable(weight):  # used as a bare @task
        weight.task_weight = 1  # type: ignore[attr-defined]
        return weight
    if not isinstance(weight, int) or weight < 1:
        raise ValueError(f"task weight must be a positive integer, got {weight!r}")

    def mark(fn: F) -> F:
        fn.task_weight = weight  # type: ignore[attr-defined]
        return fn

    return mark


class Behaviour:
    """One virtual user. Subclasses set `kind` (short, used in ids), `weight` (relative number of users of
    this kind, as in locust) and define `@task(weight)` methods that return one event, a list of events or
    None (nothing this time). `on_start()` (re)initialises the per-user state, for each new generation.
    """

    kind = "user"
    weight = 1
    gameplay = ""  # the gameplay the events come from (the part of their type before the dot)
    _task_table: tuple[tuple[str, ...], tuple[int, ...]] | None = None

    def __init__(self, index: int, seed: int | str = 0, campaign: CampaignWindow = SPRING2026,
                 prefix: str | None = None) -> None:
        self.index = index
        self.campaign = campaign
        self.prefix = prefix if prefix is not None else f"lt{seed}"
        self.rng = random.Random(f"{seed}/{type(self).__name__}/{index}")
        self.base = f"{self.prefix}-{self.kind}{index}"
        self.seq = 0  # events made by this virtual user, over all its generations: ids never repeat
        self.generation = 0
        self.user = self.base
        self.clock = self._start_clock()
        self.on_start()

    # -- what subclasses use -------------------------------------------------------------------------------
    def on_start(self) -> None:
        """Reset the per-user state (called at creation and when the user comes back as a new generation)."""

    def advance(self, ms: int) -> int:
        """Move this user's simulated clock forward by `ms` (at least 1 ms); returns the new time. A clock
        that would leave the campaign window starts a new generation: a new user id at the campaign start."""
        self.clock += max(1, int(ms))
        if self.clock >= self.campaign.ends_ms - MINUTE:
            self.generation += 1
            self.user = f"{self.base}~{self.generation}"
            self.clock = self._start_clock()
            self.on_start()
        return self.clock

    def minutes(self, lo: float, hi: float) -> int:
        return int(self.rng.uniform(lo, hi) * MINUTE)

    def event(self, type: str, data: dict[str, Any] | None = None, advance_ms: int | None = None,
              user: str | None = None) -> dict[str, Any]:
        """A new event of this user at its clock, advanced first by `advance_ms` (default 1..5 minutes; 0: not
        advanced, for a task that called `advance` itself before building data that names the user)."""
        if advance_ms is None:
            advance_ms = self.minutes(1, 5)
        if advance_ms > 0:
            self.advance(advance_ms)
        self.seq += 1
        e: dict[str, Any] = {"id": f"{self.base}-{self.seq}", "campaign": self.campaign.id,
                             "user": user or self.user, "type": type, "ts": self.clock}
        if data is not None:
            e["data"] = data
        return e

    # -- what the runner uses ------------------------------------------------------------------------------
    @classmethod
    def tasks(cls) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(method names, weights) of this class's tasks, base classes included, in definition order."""
        table = cls.__dict__.get("_task_table")
        if table is None:
            names: dict[str, int] = {}
            for klass in reversed(cls.__mro__):
                for name, attr in vars(klass).items():
                    w = getattr(attr, "task_weight", None)
                    if w is not None:
                        names[name] = w
            if not names:
                raise TypeError(f"{cls.__name__} has no @task methods")
            table = (tuple(names), tuple(names.values()))
            cls._task_table = table
        return table

    def pick(self) -> str:
        names, weights = self.tasks()
        return self.rng.choices(names, weights)[0]

    def next_events(self) -> list[dict[str, Any]]:
        """Run one task picked by weight; the events it produced (at least one)."""
        for _ in range(100):
            out = getattr(self, self.pick())()
            if out is None:
                continue
            return [out] if isinstance(out, dict) else list(out)
        raise RuntimeError(f"{type(self).__name__}: 100 tasks in a row produced no event")

    def _start_clock(self) -> int:
        c = self.campaign
        span = max(1, min(3 * DAY, (c.ends_ms - c.starts_ms) // 4))
        return c.starts_ms + self.rng.randrange(span)


class QuizPlayer(Behaviour):
    """Answers quiz questions (the first answer of a user grants a lottery chance)."""

    kind, weight, gameplay = "quiz", 3, "quiz"

    def on_start(self) -> None:
        self.question = 0

    def _answer(self, advance_ms: int) -> dict[str, Any]:
        self.question += 1
        return self.event("quiz.answered", {"question": f"q{self.question}", "correct": self.rng.random() < 0.7},
                          advance_ms)

    @task(8)
    def answer(self) -> dict[str, Any]:
        return self._answer(self.minutes(0.2, 5))

    @task(1)
    def answer_next_day(self) -> dict[str, Any]:
        return self._answer(self.minutes(18 * 60, 30 * 60))


class TaskDoer(Behaviour):
    """Completes tasks of tier 1 (often) to 3 (rarely); each pays cash, tier 3 adds a gold-pool chance."""

    kind, weight, gameplay = "task", 3, "task"
    TASKS = {1: ("share_poster", "watch_video", "follow_account"), 2: ("invite_2_friends", "review_product"),
             3: ("spend_100_cny",)}

    def on_start(self) -> None:
        self.done = 0

    def _complete(self, tier: int) -> dict[str, Any]:
        self.done += 1
        name = self.rng.choice(self.TASKS[tier])
        return self.event("task.completed", {"task": f"{name}_{self.done}", "tier": tier}, self.minutes(5, 90))

    @task(6)
    def tier1(self) -> dict[str, Any]:
        return self._complete(1)

    @task(3)
    def tier2(self) -> dict[str, Any]:
        return self._complete(2)

    @task(1)
    def tier3(self) -> dict[str, Any]:
        return self._complete(3)


class CheckinUser(Behaviour):
    """Checks in about once a day: mostly the next day (a streak), sometimes twice a day, sometimes a gap."""

    kind, weight, gameplay = "checkin", 2, "checkin"

    def _checkin(self, advance_ms: int) -> dict[str, Any]:
        return self.event("checkin.checked_in", None, advance_ms)

    @task(8)
    def next_day(self) -> dict[str, Any]:
        return self._checkin(DAY + self.minutes(-90, 90))

    @task(1)
    def again_today(self) -> dict[str, Any]:
        return self._checkin(self.minutes(1, 30))

    @task(1)
    def missed_a_day(self) -> dict[str, Any]:
        return self._checkin(2 * DAY + self.minutes(-90, 90))


class Inviter(Behaviour):
    """An inviter's assist chain: friends help (user = the inviter, data.helper = the friend); three distinct
    helpers earn the inviter a reward. Sometimes the same friend helps again, sometimes a new chain starts."""

    kind, weight, gameplay = "invite", 1, "assist"

    def on_start(self) -> None:
        self.chain = 0
        self.helpers: list[str] = []
        self.next_helper = 0
        self._new_chain()

    def _new_chain(self) -> None:
        self.chain += 1

    def _help(self, helper: str) -> dict[str, Any]:
        return self.event("assist.helped", {"helper": helper, "chain": f"chain-{self.user}-{self.chain}"}, 0)

    @task(6)
    def new_helper(self) -> dict[str, Any]:
        self.advance(self.minutes(0.5, 20))  # first: a new generation starts a new chain
        self.next_helper += 1
        helper = f"{self.user}-h{self.next_helper}"
        self.helpers.append(helper)
        return self._help(helper)

    @task(2)
    def same_helper_again(self) -> dict[str, Any] | None:
        if not self.helpers:
            return None
        helper = self.rng.choice(self.helpers)
        self.advance(self.minutes(0.5, 20))
        if helper not in self.helpers:  # a new generation began: its helpers are new too
            return self.new_helper()
        return self._help(helper)

    @task(1)
    def new_chain(self) -> dict[str, Any]:
        self._new_chain()
        return self.new_helper()


class TeamMember(Behaviour):
    """Joins a team (team.formed with a role: leader or member), later the team completes (team.completed);
    then a new team. Now and then the gameplay resends a completion for the same team (paid once)."""

    kind, weight, gameplay = "team", 1, "team"

    def on_start(self) -> None:
        self.teams = 0
        self.team: str | None = None
        self.completed = False

    def _form(self) -> dict[str, Any]:
        self.advance(self.minutes(10, 240))  # first: the team id names the user (a new generation, new id)
        self.teams += 1
        self.team = f"t-{self.user}-{self.teams}"
        self.completed = False
        role = "leader" if self.rng.random() < 0.25 else "member"
        return self.event("team.formed", {"team": self.team, "role": role}, 0)

    @task(3)
    def form_or_join(self) -> dict[str, Any]:
        if self.team is not None and not self.completed:
            return self.complete()
        return self._form()

    @task(3)
    def complete(self) -> dict[str, Any]:
        if self.team is None or self.completed:
            return self._form()
        self.advance(self.minutes(30, 12 * 60))
        if self.team is None:  # a new generation began: it has no team yet
            return self._form()
        self.completed = True
        return self.event("team.completed", {"team": self.team}, 0)

    @task(1)
    def complete_again(self) -> dict[str, Any] | None:
        if self.team is None or not self.completed:
            return None
        self.advance(self.minutes(1, 30))
        if self.team is None:
            return self._form()
        return self.event("team.completed", {"team": self.team}, 0)


BEHAVIOURS: dict[str, type[Behaviour]] = {
    b.__name__: b for b in (QuizPlayer, TaskDoer, CheckinUser, Inviter, TeamMember)
}


def make_users(behaviours: Sequence[type[Behaviour]], users: int, seed: int | str = 0,
               campaign: CampaignWindow = SPRING2026, prefix: str | None = None) -> list[Behaviour]:
    """`users` virtual users spread over the behaviours by their `weight` (largest remainder), interleaved."""
    if not behaviours:
        raise ValueError("no behaviours")
    total = sum(b.weight for b in behaviours)
    shares = [users * b.weight / total for b in behaviours]
    counts = [int(s) for s in shares]
    for i in sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])[: users - sum(counts)]:
        counts[i] += 1
    made = [[b(i, seed, campaign, prefix) for i in range(n)] for b, n in zip(behaviours, counts, strict=True)]
    out: list[Behaviour] = []
    for i in range(max(counts, default=0)):
        out += [group[i] for group in made if i < len(group)]
    return out


# -- measuring ---------------------------------------------------------------------------------------------
class LatencyRecorder:
    """Thread-safe list of latencies (ms) with outcome counts; `cut()` gives what came since the last cut."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.all: list[float] = []
        self.outcomes: Counter[str] = Counter()
        self._mark = 0

    def add(self, ms: float, outcome: str = "ok") -> None:
        with self._lock:
            self.all.append(ms)
            self.outcomes[outcome] += 1

    def cut(self) -> list[float]:
        with self._lock:
            out = self.all[self._mark:]
            self._mark = len(self.all)
        return out

    def summary(self, xs: Sequence[float] | None = None) -> dict[str, float]:
        if xs is None:
            with self._lock:
                xs = list(self.all)
        s = sorted(xs)
        return {"n": len(s), "p50": percentile(s, 0.50), "p95": percentile(s, 0.95), "p99": percentile(s, 0.99),
                "max": s[-1] if s else 0.0}


class TimedClient(PlaybusClient):
    """PlaybusClient that times each HTTP request it makes (retries included) into a LatencyRecorder.

    The outcome of a request is "200" or the name of what it raised (a retryable 5xx/503/connection error,
    RequestRejectedError). Only the client's private `_post_once` is wrapped; nothing else changes."""

    def __init__(self, url: str, recorder: LatencyRecorder, **kwargs: Any) -> None:
        self.recorder = recorder
        super().__init__(url, **kwargs)

    def _post_once(self, body: bytes, n: int) -> list[dict[str, Any]]:
        t = time.perf_counter()
        outcome = "200"
        try:
            return super()._post_once(body, n)
        except Exception as e:
            outcome = f"{type(e).__name__}: {str(e).split(':', 1)[0][:40]}"
            raise
        finally:
            self.recorder.add((time.perf_counter() - t) * 1000, outcome)


class RateLimiter:
    """A token bucket shared by threads: `acquire()` blocks until one more event may go (rate per second)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 20)
        self._tokens = self.burst
        self._t = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
                self._t = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                wait = (1 - self._tokens) / self.rate
            time.sleep(wait)


@dataclass
class _Stats:
    """What the runner counts, shared by the producer threads and the clients' sender threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    answered: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    rule_errors: Counter[str] = field(default_factory=Counter)
    sent_by_gameplay: Counter[str] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)  # a few error messages, to show


# -- the runner --------------------------------------------------------------------------------------------
class Runner:
    """Drive `users` virtual users (spread over `behaviours` by weight) against playbus at `url` through
    `clients` PlaybusClients, for `duration_s` seconds or until `events` events were sent (whichever comes
    first; at least one must be given), at most `rate_limit` events/s when set. `run()` returns the summary.
    """

    def __init__(self, url: str, behaviours: Sequence[type[Behaviour]], users: int, duration_s: float | None = None,
                 events: int | None = None, rate_limit: float | None = None, seed: int | str = 0,
                 clients: int = 4, campaign: CampaignWindow = SPRING2026, max_batch: int = 500,
                 linger_ms: float = 5, max_in_flight: int = 2000, progress_s: float = 5.0,
                 out: IO[str] | None = None, prefix: str | None = None) -> None:
        if duration_s is None and events is None:
            raise ValueError("give duration_s or events (or both)")
        if users < 1 or clients < 1:
            raise ValueError("users and clients must be at least 1")
        self.url = url
        self.behaviours = list(behaviours)
        self.users = make_users(self.behaviours, users, seed, campaign, prefix)
        self.duration_s = duration_s
        self.events = events
        self.limiter = RateLimiter(rate_limit) if rate_limit else None
        self.rate_limit = rate_limit
        self.seed = seed
        self.clients = min(clients, users)
        self.max_batch = max_batch
        self.linger_ms = linger_ms
        self.max_in_flight = max_in_flight
        self.progress_s = progress_s
        self.out = out if out is not None else sys.stdout
        self.requests = LatencyRecorder()
        self.latency = LatencyRecorder()  # per event: send() to result
        self.stats = _Stats()
        self._stop = threading.Event()
        self._quota = events
        self._quota_lock = threading.Lock()
        self._t0 = 0.0
        self._clients: list[TimedClient] = []

    def _take(self) -> bool:
        if self._stop.is_set():
            return False
        if self._quota is None:
            return True
        with self._quota_lock:
            if self._quota <= 0:
                return False
            self._quota -= 1
            return True

    def _on_done(self, fut: Future[dict[str, Any]], ev: dict[str, Any], t: float, slots: threading.Semaphore
                 ) -> None:
        ms = (time.perf_counter() - t) * 1000
        st = self.stats
        try:
            r = fut.result()
        except Exception as e:  # noqa: BLE001 - counted and shown, the run goes on
            with st.lock:
                st.answered += 1
                name = type(e).__name__
                st.errors[name] += 1
                if len(st.samples) < 5:
                    st.samples.append(f"{name}: {e}")
            self.latency.add(ms, "error")
        else:
            status = r.get("status", "?")
            with st.lock:
                st.answered += 1
                st.statuses[status] += 1
                for a in r.get("actions") or ():
                    st.actions[a.get("type", "?")] += 1
                for err in r.get("errors") or ():
                    if status == "applied":
                        st.rule_errors[str(err).split(":", 1)[0]] += 1
                    if len(st.samples) < 5:
                        st.samples.append(f"{ev['id']} {status}: {err}")
            self.latency.add(ms, status)
        finally:
            slots.release()

    def _callback(self, ev: dict[str, Any], t: float, slots: threading.Semaphore
                  ) -> Callable[[Future[dict[str, Any]]], None]:
        def done(fut: Future[dict[str, Any]]) -> None:
            self._on_done(fut, ev, t, slots)

        return done

    def _produce(self, client: TimedClient, users: list[Behaviour]) -> None:
        slots = threading.Semaphore(self.max_in_flight)
        st = self.stats
        i = 0
        try:
            while True:
                user = users[i % len(users)]
                i += 1
                for ev in user.next_events():
                    if not self._take():
                        return
                    if self.limiter is not None:
                        self.limiter.acquire()
                    while not slots.acquire(timeout=0.2):
                        if self._stop.is_set():
                            return
                    t = time.perf_counter()
                    with st.lock:
                        st.sent += 1
                        st.sent_by_gameplay[ev["type"].split(".", 1)[0]] += 1
                        st.by_type[ev["type"]] += 1
                    client.send(ev).add_done_callback(self._callback(ev, t, slots))
        except Exception as e:  # noqa: BLE001 - a producer that dies is reported, not silent
            with st.lock:
                st.errors[f"producer {type(e).__name__}"] += 1
                st.samples.append(f"producer died: {type(e).__name__}: {e}")

    def _progress_line(self, last: dict[str, float]) -> str:
        now = time.perf_counter()
        with self.stats.lock:
            sent, answered = self.stats.sent, self.stats.answered
            applied, dup = self.stats.statuses["applied"], self.stats.statuses["duplicate"]
            rej, errs = self.stats.statuses["rejected"], sum(self.stats.errors.values())
        dt = max(1e-9, now - last["t"])
        rate = (answered - last["answered"]) / dt
        last.update(t=now, answered=answered)
        req = self.requests.summary(self.requests.cut())
        return (f"[{now - self._t0:6.1f}s] sent {sent:,} answered {answered:,} | {rate:,.0f} events/s now, "
                f"{answered / max(1e-9, now - self._t0):,.0f} avg | requests {req['n']} p50 {req['p50']:.1f} "
                f"p95 {req['p95']:.1f} p99 {req['p99']:.1f} ms | applied {applied:,} duplicate {dup:,} "
                f"rejected {rej:,} errors {errs:,} | in flight {sent - answered:,}")

    def run(self) -> dict[str, Any]:
        self._t0 = time.perf_counter()
        self._clients = [TimedClient(self.url, self.requests, max_batch=self.max_batch, linger_ms=self.linger_ms,
                                     max_pending=max(self.max_in_flight, self.max_batch))
                         for _ in range(self.clients)]
        shares = [self.users[i::self.clients] for i in range(self.clients)]
        threads = [threading.Thread(target=self._produce, args=(c, u), name=f"harness-producer-{i}", daemon=True)
                   for i, (c, u) in enumerate(zip(self._clients, shares, strict=True))]
        for t in threads:
            t.start()
        deadline = None if self.duration_s is None else self._t0 + self.duration_s
        last = {"t": self._t0, "answered": 0.0}
        next_progress = self._t0 + self.progress_s
        try:
            while any(t.is_alive() for t in threads):
                now = time.perf_counter()
                if deadline is not None and now >= deadline:
                    break
                if now >= next_progress:
                    print(self._progress_line(last), file=self.out, flush=True)
                    next_progress += self.progress_s
                wake = min(next_progress, deadline) if deadline is not None else next_progress
                time.sleep(max(0.01, min(0.2, wake - time.perf_counter())))
        except KeyboardInterrupt:
            print("interrupted: finishing the events in flight", file=self.out, flush=True)
        finally:
            self._stop.set()
            for t in threads:
                t.join(30)
            sending_s = time.perf_counter() - self._t0
            for c in self._clients:
                c.close(60)
        elapsed = time.perf_counter() - self._t0
        return self._summary(elapsed, sending_s)

    def _summary(self, elapsed: float, sending_s: float) -> dict[str, Any]:
        st = self.stats
        with st.lock:
            answered_ok = sum(st.statuses.values())
            out: dict[str, Any] = {
                "url": self.url, "seed": self.seed, "users": len(self.users), "clients": self.clients,
                "rate_limit": self.rate_limit,
                "users_by_behaviour": dict(Counter(type(u).__name__ for u in self.users)),
                "duration_s": round(elapsed, 3), "sending_s": round(sending_s, 3),
                "events_sent": st.sent, "events_answered": st.answered,
                "events_per_s": round(answered_ok / elapsed, 1) if elapsed > 0 else 0.0,
                "statuses": dict(st.statuses), "errors": dict(st.errors), "rule_errors": dict(st.rule_errors),
                "events_by_gameplay": dict(st.sent_by_gameplay), "events_by_type": dict(st.by_type),
                "actions_by_type": dict(st.actions), "error_samples": list(st.samples),
            }
        req = self.requests.summary()
        out["requests"] = req["n"]
        out["request_outcomes"] = dict(self.requests.outcomes)
        out["retries"] = sum(c.retries for c in self._clients)
        out["request_latency_ms"] = {k: round(v, 2) for k, v in req.items() if k != "n"}
        ev = self.latency.summary()
        out["event_latency_ms"] = {k: round(v, 2) for k, v in ev.items() if k != "n"}
        out["mean_events_per_request"] = round(st.answered / req["n"], 1) if req["n"] else 0.0
        return out


def format_summary(s: dict[str, Any]) -> str:
    r, e = s["request_latency_ms"], s["event_latency_ms"]
    lines = [
        f"summary: {s['events_answered']:,} of {s['events_sent']:,} events answered in {s['duration_s']:.1f} s "
        f"-> {s['events_per_s']:,.0f} events/s ({s['users']} users, {s['clients']} clients, seed {s['seed']})",
        f"  requests: {s['requests']:,} (about {s['mean_events_per_request']} events each, {s['retries']} retries)"
        f"  latency p50 {r['p50']:.1f} ms  p95 {r['p95']:.1f} ms  p99 {r['p99']:.1f} ms  max {r['max']:.1f} ms",
        f"  per event (send -> result): p50 {e['p50']:.1f} ms  p95 {e['p95']:.1f} ms  p99 {e['p99']:.1f} ms",
        f"  request outcomes: {s['request_outcomes']}",
        f"  statuses: {s['statuses']}   errors: {s['errors'] or 'none'}   rule errors: {s['rule_errors'] or 'none'}",
        f"  events by gameplay: {s['events_by_gameplay']}",
        f"  actions granted: {s['actions_by_type']}",
        f"  users by behaviour: {s['users_by_behaviour']}",
    ]
    if s["error_samples"]:
        lines.append("  error samples: " + " | ".join(s["error_samples"]))
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Locust-style load harness for playbus (POST /v1/events through "
                                            "PlaybusClient).")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="playbus to load (default: %(default)s)")
    p.add_argument("--users", type=int, default=200, help="virtual users (default: %(default)s)")
    p.add_argument("--duration", type=float, help="seconds to run (default 30 unless --events is given)")
    p.add_argument("--events", type=int, help="stop after this many events")
    p.add_argument("--rate", type=float, help="at most this many events/s (default: as fast as answered)")
    p.add_argument("--clients", type=int, default=4, help="PlaybusClient producer threads (default: %(default)s)")
    p.add_argument("--seed", help="seed of the virtual users (default: from the clock; printed)")
    p.add_argument("--behaviours", default=",".join(BEHAVIOURS),
                   help="comma-separated behaviour classes (default: %(default)s)")
    p.add_argument("--batch", type=int, default=500, help="PlaybusClient max_batch (default: %(default)s)")
    p.add_argument("--linger-ms", type=float, default=5, help="PlaybusClient linger_ms (default: %(default)s)")
    p.add_argument("--in-flight", type=int, default=2000, help="unanswered events per client (default: %(default)s)")
    p.add_argument("--progress", type=float, default=5.0, help="seconds between progress lines (default: %(default)s)")
    p.add_argument("--config", default="config/example.yaml",
                   help="campaign config: its window for timestamps; with --start-cluster, the cluster's config")
    p.add_argument("--start-cluster", action="store_true",
                   help="start run_cluster.py (embedded Redis in a temp dir, a free port), load it, stop it")
    p.add_argument("--shards", type=int, help="with --start-cluster: --shards for run_cluster.py")
    p.add_argument("--cluster-log", action="store_true", help="with --start-cluster: echo run_cluster's output")
    args = p.parse_args(argv)

    try:
        chosen = [BEHAVIOURS[name.strip()] for name in args.behaviours.split(",") if name.strip()]
    except KeyError as e:
        p.error(f"unknown behaviour {e}; known: {', '.join(BEHAVIOURS)}")
    duration = args.duration if args.duration is not None or args.events is not None else 30.0
    seed: int | str = args.seed if args.seed is not None else int(time.time())
    config_path = args.config if Path(args.config).is_absolute() else ROOT / args.config
    campaign = CampaignWindow.from_config(config_path)

    cluster: ClusterProcess | None = None
    url = args.url
    if args.start_cluster:
        echo = (lambda line: print(f"  | {line}", flush=True)) if args.cluster_log else None
        cluster = ClusterProcess(config_path, shards=args.shards, echo=echo)
        t = time.monotonic()
        print(f"starting run_cluster.py --config {args.config} ...", flush=True)
        cluster.start()
        url = cluster.url
        print(f"cluster up in {time.monotonic() - t:.1f} s at {url} (redis {cluster.redis_url})", flush=True)
    code = 0
    summary: dict[str, Any] | None = None
    try:
        runner = Runner(url, chosen, args.users, duration_s=duration, events=args.events, rate_limit=args.rate,
                        seed=seed, clients=args.clients, campaign=campaign, max_batch=args.batch,
                        linger_ms=args.linger_ms, max_in_flight=args.in_flight, progress_s=args.progress)
        limit = f"{duration:g} s" if duration is not None else ""
        if args.events is not None:
            limit = f"{limit} or {args.events:,} events".lstrip(" or")
        print(f"load: {len(runner.users)} users ({', '.join(b.__name__ for b in chosen)}) via {runner.clients} "
              f"clients against {url} for {limit}; seed {seed}"
              + (f"; at most {args.rate:g} events/s" if args.rate else ""), flush=True)
        summary = runner.run()
        print(format_summary(summary), flush=True)
        if summary["events_answered"] == 0 or summary["errors"]:
            code = 1
    finally:
        if cluster is not None:
            rep = cluster.stop()
            print(f"cluster stop: exit code {rep.exit_code}, 'playbus: stopped' "
                  f"{'printed' if rep.stopped_line else 'MISSING'}, {rep.seconds} s"
                  + (", no exit within the stop timeout" if rep.timed_out else "")
                  + (f", leftover redis {rep.leftover_redis}" if rep.leftover_redis else "")
                  + (f", stragglers {rep.stragglers}" if rep.stragglers else ""), flush=True)
            if not rep.ok:
                print("cluster did not stop cleanly; output tail:\n" + cluster.output(40), flush=True)
                code = code or 1
    if summary is not None:
        if cluster is not None and cluster.stop_report is not None:
            summary["cluster_stop"] = cluster.stop_report.as_dict()
        print(json.dumps(summary, sort_keys=True), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
