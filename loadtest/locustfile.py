"""locust users for playbus: one per gameplay of config/example.yaml, plus a bulk stream producer.

    make loadtest                                        # headless, against a cluster it starts (locust_run.py)
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 [--playbus-redis-url redis://...]

Each gameplay user wraps one deterministic virtual user of loadtest/harness.py (QuizPlayer, TaskDoer,
CheckinUser, Inviter, TeamMember), numbered per class in spawn order, and posts what it does, one task at a
time, as `POST /v1/events` with a JSON array body. A request fails (in locust's statistics) unless it is
answered 200 with one result per event, none `rejected` and no rule error (`harness.reply_problem`). Requests
are named by gameplay ("/v1/events quiz"), so the report has a row per gameplay. User weights are the
behaviours' weights.

The users post only what gameplays send. The events the example's rules make (assist.credited to an inviter,
team.reward to every member, the task.expired and checkin.missed timers) are made and decided by playbus, after
the request is answered; they are not in the request's results, and a gameplay could not post them (they would
be rejected).

`StreamProducerUser` (exactly one, whatever -u says) writes record batches of events of its own virtual users
(all kinds) into the input partitions with `playbus.client.StreamProducer`, at a fixed rate; each batch is a
locust request of type XADD. It needs the Redis that playbus uses (`--playbus-redis-url` or PLAYBUS_REDIS_URL);
without it, it stops at once and only the HTTP users run.

Options (locust's command line, or the environment variable named in brackets):
    --playbus-seed S          seed of the virtual users' events and ids [PLAYBUS_SEED]; default: the clock,
                              so that a second run against the same Redis is not all duplicates
    --playbus-config FILE     the campaign whose window the events' timestamps follow [PLAYBUS_CONFIG];
                              default: spring2026 of config/example.yaml
    --playbus-wait-min/-max   a gameplay user's think time between requests, seconds [PLAYBUS_WAIT_MIN/MAX]
    --playbus-stream-rate N   events/s of the stream producer [PLAYBUS_STREAM_RATE]
    --playbus-stream-batch N  events per send_many (one record batch per partition) [PLAYBUS_STREAM_BATCH]

Only this module of playbus imports locust (which monkey-patches the process with gevent); it never imports Ray.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from typing import Any

import gevent
import locust.stats
import msgpack
from locust import FastHttpUser, User, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import WorkerRunner

from playbus.client import StreamProducer
from playbus.loadtest import harness as h

__all__ = ["GAMEPLAY_USERS", "AssistUser", "CheckinUser", "QuizUser", "StreamProducerUser", "TaskUser", "TeamUser"]

log = logging.getLogger("playbus.locust")

DEFAULTS: dict[str, Any] = {
    "playbus_seed": "", "playbus_redis_url": "", "playbus_config": "", "playbus_wait_min": 0.05,
    "playbus_wait_max": 0.15, "playbus_stream_rate": 500.0, "playbus_stream_batch": 100,
}
_CLOCK_SEED = str(int(time.time()))  # the seed when none is given: one per process


def _options(parser: Any) -> None:
    g = parser.add_argument_group("playbus")
    g.add_argument("--playbus-seed", env_var="PLAYBUS_SEED", default=DEFAULTS["playbus_seed"],
                   help="seed of the virtual users (default: the clock)")
    g.add_argument("--playbus-redis-url", env_var="PLAYBUS_REDIS_URL", default=DEFAULTS["playbus_redis_url"],
                   help="the Redis playbus uses, for the stream producer (default: no stream producer)")
    g.add_argument("--playbus-config", env_var="PLAYBUS_CONFIG", default=DEFAULTS["playbus_config"],
                   help="campaign config whose window the timestamps follow (default: config/example.yaml's)")
    g.add_argument("--playbus-wait-min", env_var="PLAYBUS_WAIT_MIN", type=float, default=DEFAULTS["playbus_wait_min"],
                   help="think time of a gameplay user between requests, minimum seconds (default: %(default)s)")
    g.add_argument("--playbus-wait-max", env_var="PLAYBUS_WAIT_MAX", type=float, default=DEFAULTS["playbus_wait_max"],
                   help="think time, maximum seconds (default: %(default)s)")
    g.add_argument("--playbus-stream-rate", env_var="PLAYBUS_STREAM_RATE", type=float,
                   default=DEFAULTS["playbus_stream_rate"],
                   help="events/s of the stream producer (default: %(default)s)")
    g.add_argument("--playbus-stream-batch", env_var="PLAYBUS_STREAM_BATCH", type=int,
                   default=DEFAULTS["playbus_stream_batch"],
                   help="events per send_many of the stream producer (default: %(default)s)")


events.init_command_line_parser.add_listener(_options)  # type: ignore[no-untyped-call]


def option(environment: Environment, name: str) -> Any:
    """A playbus option of this run; when locust runs as a library (no command line), its environment variable
    or its default."""
    if environment.parsed_options is not None:
        return getattr(environment.parsed_options, name, DEFAULTS[name])
    raw = os.environ.get(name.upper())  # playbus_seed: PLAYBUS_SEED, as on the command line
    if raw is None:
        return DEFAULTS[name]
    default = DEFAULTS[name]
    return type(default)(raw) if isinstance(default, (int, float)) else raw


def seed_of(environment: Environment) -> str:
    return str(option(environment, "playbus_seed") or _CLOCK_SEED)


_campaigns: dict[str, h.CampaignWindow] = {}


def campaign_of(environment: Environment) -> h.CampaignWindow:
    path = str(option(environment, "playbus_config") or "")
    if not path:
        return h.SPRING2026
    if path not in _campaigns:
        _campaigns[path] = h.CampaignWindow.from_config(path)
    return _campaigns[path]


def id_prefix(environment: Environment, kind: str) -> str:
    """"lt<seed>" for gameplay users ("ls<seed>" for the stream producer's), plus "w<n>" on worker n of a
    distributed run, so that ids and user ids never collide between users, producers and workers."""
    runner = environment.runner
    worker = f"w{runner.worker_index}" if isinstance(runner, WorkerRunner) else ""
    return f"{kind}{seed_of(environment)}{worker}"


# -- the gameplay users --------------------------------------------------------------------------------------
class GameplayUser(FastHttpUser):
    """One deterministic virtual user (`behaviour`) posting its events to `POST /v1/events`."""

    abstract = True
    behaviour_class: type[h.Behaviour] = h.Behaviour
    _numbers: itertools.count[int]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._numbers = itertools.count()  # the index of each user of this class, in spawn order
        if not cls.__dict__.get("abstract", False):
            cls.weight = cls.behaviour_class.weight

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.behaviour = self.behaviour_class(next(self._numbers), seed_of(environment), campaign_of(environment),
                                              id_prefix(environment, "lt"))
        self.request_name = f"/v1/events {self.behaviour_class.gameplay}"
        self._think = random.Random(f"think/{self.behaviour.base}")

    def wait_time(self) -> float:
        lo = float(option(self.environment, "playbus_wait_min"))
        hi = max(lo, float(option(self.environment, "playbus_wait_max")))
        return self._think.uniform(lo, hi)

    @task
    def play(self) -> None:
        sent = self.behaviour.next_events()
        with self.client.post("/v1/events", json=sent, name=self.request_name, catch_response=True) as resp:
            if not resp.status_code:  # no HTTP answer at all: connection refused, reset, timeout
                resp.failure(f"no reply: {type(resp.error).__name__}" if resp.error else "no reply")
                return
            try:
                reply = resp.json()
            except ValueError:
                reply = None
            problem = h.reply_problem(resp.status_code, reply, sent)
            if problem is None:
                resp.success()
            else:
                resp.failure(problem)


class QuizUser(GameplayUser):
    """quiz.answered (QuizPlayer)."""

    behaviour_class = h.QuizPlayer


class TaskUser(GameplayUser):
    """task.accepted then task.completed of a task by tier, in one request; now and then completed after the 24
    hours the rules allow (TaskDoer)."""

    behaviour_class = h.TaskDoer


class CheckinUser(GameplayUser):
    """checkin.checked_in about once a simulated day (harness.CheckinUser)."""

    behaviour_class = h.CheckinUser


class AssistUser(GameplayUser):
    """assist.helped {inviter, chain}, posted as the helper (user = a friend of this inviter): an inviter's chain of
    helpers, whom the rules credit to the inviter (Inviter)."""

    behaviour_class = h.Inviter


class TeamUser(GameplayUser):
    """team.completed {team, members: [{user, role}]}, once per team, as the leader; now and then resent
    (TeamMember)."""

    behaviour_class = h.TeamMember


GAMEPLAY_USERS: dict[str, type[GameplayUser]] = {
    u.behaviour_class.gameplay: u for u in (QuizUser, TaskUser, CheckinUser, AssistUser, TeamUser)
}


# -- the bulk producer ---------------------------------------------------------------------------------------
class StreamProducerUser(User):
    """Record batches into the input partitions through StreamProducer, at `--playbus-stream-rate` events/s."""

    fixed_count = 1
    pool = 50  # virtual users (all kinds, by weight) whose events it writes, each user's in order
    _numbers = itertools.count()

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.index = next(self._numbers)
        self.batch = max(1, int(option(environment, "playbus_stream_batch")))
        self.period_s = self.batch / max(1e-3, float(option(environment, "playbus_stream_rate")))
        prefix = f"{id_prefix(environment, 'ls')}p{self.index}"
        self.users = h.make_users(list(h.BEHAVIOURS.values()), self.pool, seed_of(environment),
                                  campaign_of(environment), prefix)
        self._turn = 0
        self._due = 0.0
        self.redis: Any = None
        self.producer: StreamProducer | None = None

    def on_start(self) -> None:
        url = str(option(self.environment, "playbus_redis_url") or "")
        if not url:
            log.warning("StreamProducerUser: no --playbus-redis-url (PLAYBUS_REDIS_URL); the stream producer stops")
            raise StopUser()
        from playbus.actors.store.connect import connect

        self.redis = connect(url, socket_timeout=30)
        self.producer = StreamProducer(self.redis, batch=self.batch)
        self._due = time.monotonic()

    def on_stop(self) -> None:
        if self.redis is not None:
            self.redis.close()

    def wait_time(self) -> float:
        """A fixed schedule: one batch every `period_s`, whatever each took (late batches go at once)."""
        self._due += self.period_s
        return max(0.0, self._due - time.monotonic())

    def next_batch(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < self.batch:
            out += self.users[self._turn % len(self.users)].next_events()
            self._turn += 1
        return out

    @task
    def send_batch(self) -> None:
        assert self.producer is not None
        batch = self.next_batch()
        size = len(msgpack.packb(batch))
        t = time.perf_counter()
        error: Exception | None = None
        try:
            self.producer.send_many(batch)
        except Exception as e:  # noqa: BLE001 - a failed request in the statistics, the run goes on
            error = e
        self.environment.events.request.fire(
            request_type="XADD", name="playbus:{kg*}:in record batches", response_time=(time.perf_counter() - t) * 1000,
            response_length=size, exception=error, context={"events": len(batch)})


def _check_config(environment: Environment, **_: Any) -> None:
    """Say so when the campaign config has gameplays that no user class plays."""
    path = str(option(environment, "playbus_config") or "")
    if not path:
        return
    from playbus.config import load_config

    missing = sorted({r.on.split(".", 1)[0] for c in load_config(path).campaigns for r in c.rules}
                     - set(GAMEPLAY_USERS))
    if missing:
        log.warning("no locust user plays the gameplays %s of %s", ", ".join(missing), path)


events.init.add_listener(_check_config)  # type: ignore[no-untyped-call]


def _final_csv(environment: Environment, **_: Any) -> None:
    """locust writes its CSV files once a second and not at the end, so the last second would be missing from
    <prefix>_stats.csv: give its writer one more turn, after the users have stopped (the `quitting` event)."""
    if getattr(environment.parsed_options, "csv_prefix", None) and environment.runner is not None \
            and not isinstance(environment.runner, WorkerRunner):
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.25)


events.quitting.add_listener(_final_csv)  # type: ignore[no-untyped-call]
