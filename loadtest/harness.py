"""The deterministic virtual users of the load tools, and what they measure with.

Virtual users are instances of `Behaviour` subclasses; each subclass has `@task(weight)` methods that
produce the events of one gameplay for that user, matching the rules of config/example.yaml and the event
shapes of config/example-events.jsonl:

    QuizPlayer   quiz.answered       {question, correct}
    TaskDoer     task.accepted       {task, tier 1|2|3}  then  task.completed {task, tier}, in one request
                                     (mostly within the 24 hours the rules allow, sometimes too late)
    CheckinUser  checkin.checked_in  (about one a day; sometimes twice a day, sometimes a missed day)
    Inviter      assist.helped       {inviter, chain}  (user = the helper, a friend of this inviter; the rules
                                     credit the inviter with an event of their own)
    TeamMember   team.completed      {team, members: [{user, role}]}  (once per team, user = the leader, this
                                     virtual user; the rules reward every member by role)

Everything a virtual user does is deterministic for a seed: its event ids (unique: "<prefix>-<kind><n>-<seq>"),
its user ids, its data, and its timestamps, which follow a simulated clock that only moves forward inside the
campaign window (a user whose clock reaches the end of the campaign comes back as a new user, "~<generation>").

loadtest/locustfile.py wraps each behaviour in a locust user (`make loadtest`, loadtest/locust_run.py);
`reply_problem` is how it judges a reply of `POST /v1/events`. `LatencyRecorder` and `TimedClient` (a
PlaybusClient that times its requests) are what loadtest/soak.py measures with. This module never imports
locust (it monkey-patches the process) nor Ray.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from playbus.client import PlaybusClient
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
    "TaskDoer",
    "TeamMember",
    "TimedClient",
    "make_users",
    "reply_problem",
    "task",
]

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

    # -- what the load tools use ------------------------------------------------------------------------------
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
    """Accepts a task of tier 1 (often) to 3 (rarely) and completes it, both in one request (task.accepted, then
    task.completed). Completed within the 24 hours the campaign allows, a task pays cash by tier and tier 3 adds a
    gold-pool chance; one task in ten is completed after its deadline and pays nothing."""

    kind, weight, gameplay = "task", 3, "task"
    TASKS = {1: ("share_poster", "watch_video", "follow_account"), 2: ("invite_2_friends", "review_product"),
             3: ("spend_100_cny",)}
    LATE = 0.1  # share of tasks completed after their 24 hours

    def on_start(self) -> None:
        self.done = 0

    def _complete(self, tier: int) -> list[dict[str, Any]]:
        self.done += 1
        name = self.rng.choice(self.TASKS[tier])
        data = {"task": f"{name}_{self.done}", "tier": tier}
        took = DAY + self.minutes(1, 6 * 60) if self.rng.random() < self.LATE else self.minutes(2, 120)
        accepted = self.event("task.accepted", data, self.minutes(5, 90))
        generation = self.generation
        completed = self.event("task.completed", dict(data), took)
        if self.generation != generation:  # the campaign ended first: the task was left undone
            return [accepted]
        return [accepted, completed]

    @task(6)
    def tier1(self) -> list[dict[str, Any]]:
        return self._complete(1)

    @task(3)
    def tier2(self) -> list[dict[str, Any]]:
        return self._complete(2)

    @task(1)
    def tier3(self) -> list[dict[str, Any]]:
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
    """An inviter's assist chain: friends help, and the assist gameplay reports each help as the helper (user = the
    friend, data.inviter = this virtual user); three distinct helpers earn the inviter a reward. Sometimes the
    same friend helps again, sometimes a new chain starts. The inviter itself sends nothing."""

    kind, weight, gameplay = "invite", 1, "assist"

    def on_start(self) -> None:
        self.chain = 0
        self.helpers: list[str] = []
        self.next_helper = 0
        self._new_chain()

    def _new_chain(self) -> None:
        self.chain += 1

    def _help(self, helper: str) -> dict[str, Any]:
        return self.event("assist.helped", {"inviter": self.user, "chain": f"chain-{self.user}-{self.chain}"}, 0,
                          user=helper)

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
    """A team leader: each of its teams (this user as the leader, 1..MEMBERS members) completes after a while, and
    the team gameplay reports it with ONE team.completed as the leader, with the member list; the rules reward
    every member by role. Now and then the gameplay resends a completion for the same team (paid once)."""

    kind, weight, gameplay = "team", 1, "team"
    MEMBERS = 4  # the most members (besides the leader) of a team

    def on_start(self) -> None:
        self.teams = 0
        self.last: dict[str, Any] | None = None  # the data of the last team completed

    def _completed(self) -> dict[str, Any]:
        assert self.last is not None
        return self.event("team.completed", {"team": self.last["team"],
                                             "members": [dict(m) for m in self.last["members"]]}, 0)

    @task(6)
    def complete(self) -> dict[str, Any]:
        self.advance(self.minutes(30, 12 * 60))  # first: the team names its leader (a new generation, new names)
        self.teams += 1
        team = f"t-{self.user}-{self.teams}"
        members = [{"user": self.user, "role": "leader"}]
        members += [{"user": f"{team}-m{i}", "role": "member"} for i in range(1, self.rng.randint(1, self.MEMBERS) + 1)]
        self.last = {"team": team, "members": members}
        return self._completed()

    @task(1)
    def complete_again(self) -> dict[str, Any] | None:
        if self.last is None:
            return None
        self.advance(self.minutes(1, 30))
        if self.last is None:  # a new generation began: it has no team yet
            return self.complete()
        return self._completed()


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


def reply_problem(status: int, reply: Any, sent: Sequence[dict[str, Any]]) -> str | None:
    """What is wrong with the reply of `POST /v1/events` for the events `sent`, or None when it is good: status
    200 with `{"results": [...]}`, one result per event, in order, none `rejected` and no rule error. `reply` is
    the decoded JSON body (anything else counts as unreadable). The message names no id, so that a load tool
    that groups failures by message (locust) shows one line per kind of problem."""
    if status != 200:
        return f"HTTP {status}"
    results = reply.get("results") if isinstance(reply, dict) else None
    if not isinstance(results, list):
        return "200 without a results list"
    if len(results) != len(sent):
        return f"{len(results)} results for {len(sent)} events"
    for r, e in zip(results, sent, strict=True):
        if not isinstance(r, dict) or r.get("id") != e["id"]:
            return "results not in request order"
        st = r.get("status")
        errors = r.get("errors") or []
        if st == "rejected":
            why = str(errors[0]) if errors else "no reason given"
            return f"rejected {e['type']}: {why[:100]}"
        if st not in ("applied", "duplicate"):
            return f"unknown status {st!r}"
        if errors:
            return f"rule error on {e['type']}: {str(errors[0]).split(':', 1)[0][:80]}"
    return None


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
