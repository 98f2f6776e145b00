"""Deliverer against a real Redis and a real local HTTP receiver whose answers are scripted per action id."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from playbus.actors.service.delivery import GROUP, Deliverer, DeliveryError, backoff_delay
from playbus.config.schema import TargetConfig

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Call:
    aid: str
    key: str | None
    content_type: str | None
    body: bytes
    at: float  # time.monotonic() on arrival
    headers: dict[str, str]


class Receiver:
    """A webhook on 127.0.0.1: per action id, a list of (sleep seconds, status) steps, one per attempt
    (the last one repeats); 200 at once for an id without a plan. Records every request."""

    def __init__(self) -> None:
        self.plans: dict[str, list[tuple[float, int]]] = {}
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        self._runner = web.AppRunner(self._app(), handle_signals=False, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.SockSite(self._runner, sock).start())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        aid = json.loads(body)["id"]
        with self._lock:
            n = sum(1 for c in self.calls if c.aid == aid)
            self.calls.append(Call(aid, request.headers.get("Idempotency-Key"),
                                   request.headers.get("Content-Type"), body, time.monotonic(), dict(request.headers)))
            plan = self.plans.get(aid, [(0.0, 200)])
        sleep, status = plan[min(n, len(plan) - 1)]
        if sleep:
            await asyncio.sleep(sleep)
        return web.Response(status=status, text=f"answer {status}")

    def reset(self) -> None:
        with self._lock:
            self.plans.clear()
            self.calls.clear()

    def of(self, aid: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.aid == aid]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def hook(receiver: Receiver) -> Receiver:
    receiver.reset()
    return receiver


def action(aid: str, type_: str = "wallet.grant_cash") -> dict[str, Any]:
    return {"id": aid, "type": type_, "campaign": "spring2026", "user": "u1", "params": {"amount_cents": 5},
            "cause": "evt-" + aid, "rule": "r1", "script_version": 1}


def push(r: Any, kg: int, a: dict[str, Any]) -> None:
    r.xadd(f"playbus:{{kg{kg}}}:outbox", {"action": json.dumps(a)})


def until(cond: Callable[[], bool], step: Callable[[], object] = lambda: None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        step()
        time.sleep(0.002)


def settled(r: Any, groups: list[int]) -> bool:
    """Nothing pending, nothing left in any outbox, no retry scheduled, no attempt count left over."""
    for kg in groups:
        p = f"playbus:{{kg{kg}}}:"
        if r.xpending(p + "outbox", GROUP)["pending"] or r.xlen(p + "outbox"):
            return False
        if r.zcard(p + "retry") or r.hlen(p + "attempts"):
            return False
    return True


def dead_letters(r: Any) -> dict[str, dict[str, str]]:
    out = {}
    for _, f in r.xrange("playbus:dead"):
        fields = {k.decode(): v.decode() for k, v in f.items()}
        out[json.loads(fields["action"])["id"]] = fields
    return out


def wallet(url: str, **kw: Any) -> dict[str, TargetConfig]:
    return {"wallet": TargetConfig(webhook=url, **kw)}


def test_each_action_is_delivered_retried_or_dead_lettered_as_its_target_answers(
    clean_redis: Any, hook: Receiver
) -> None:
    r = clean_redis
    hook.plans.update({
        "flaky": [(0, 500), (0, 500), (0, 200)],
        "slow": [(1.0, 200), (0, 200)],  # longer than timeout_s once
        "down": [(0, 503)],
        "bad": [(0, 400)],
        "busy": [(0, 429), (0, 204)],
    })
    ids = ["ok", "flaky", "slow", "down", "bad", "busy"]
    for i, aid in enumerate(ids):
        push(r, i % 3, action(aid))
    d = Deliverer(r, wallet(hook.url, max_attempts=5, timeout_s=0.3), [0, 1, 2], "d1", base_backoff_s=0.01)

    until(lambda: settled(r, [0, 1, 2]), d.run_once)

    counts = {aid: len(hook.of(aid)) for aid in ids}
    assert counts == {"ok": 1, "flaky": 3, "slow": 2, "down": 5, "bad": 1, "busy": 2}
    for c in hook.calls:
        assert c.key == c.aid  # the same Idempotency-Key, the action id, on every attempt
        assert c.content_type == "application/json"
        assert json.loads(c.body) == action(c.aid)
    dead = dead_letters(r)
    assert set(dead) == {"down", "bad"}
    assert dead["down"]["attempts"] == "5" and dead["down"]["error"].startswith("HTTP 503")
    assert dead["bad"]["attempts"] == "1" and dead["bad"]["error"].startswith("HTTP 400")
    assert d.stats() == {"delivered": 4, "retried": 2 + 1 + 4 + 1, "dead": 2, "claimed": 0}


def test_backoff_grows_between_attempts_with_a_jitter_fixed_by_the_action_id(
    clean_redis: Any, hook: Receiver
) -> None:
    r = clean_redis
    base, attempts = 0.02, 6
    delays = [backoff_delay("down", n, base, 30) for n in range(1, attempts)]
    assert delays == [backoff_delay("down", n, base, 30) for n in range(1, attempts)]  # no randomness
    assert all(base * 2 ** (n - 1) / 2 <= x <= base * 2 ** (n - 1) for n, x in enumerate(delays, 1))
    assert backoff_delay("down", 40, base, 30) <= 30
    hook.plans["down"] = [(0, 503)]
    push(r, 5, action("down"))
    d = Deliverer(r, wallet(hook.url, max_attempts=attempts), [5], "d1", base_backoff_s=base, poll_s=0.005)
    th = threading.Thread(target=d.run_forever)
    th.start()
    try:
        until(lambda: "down" in dead_letters(r))
    finally:
        d.stop()
        th.join(10)
    times = [c.at for c in hook.of("down")]
    gaps = [b - a for a, b in pairwise(times)]
    assert len(times) == attempts
    for gap, delay in zip(gaps, delays, strict=True):
        assert delay - 0.003 <= gap <= delay + 0.25  # never early; late only by scheduling noise
    for (g1, g2), (d1, d2) in zip(pairwise(gaps), pairwise(delays), strict=True):
        if d2 - d1 > 0.03:  # clearly apart in the schedule: clearly apart on the wire
            assert g2 > g1
    assert gaps[-1] > 4 * gaps[0]
    assert dead_letters(r)["down"]["attempts"] == str(attempts)
    assert settled(r, [5])


def test_attempt_counts_survive_a_restart_of_the_deliverer(clean_redis: Any, hook: Receiver) -> None:
    r = clean_redis
    hook.plans["down"] = [(0, 503)]
    push(r, 7, action("down"))
    first = Deliverer(r, wallet(hook.url, max_attempts=4), [7], "d1", base_backoff_s=0.01)
    until(lambda: len(hook.of("down")) == 2, first.run_once)
    del first
    second = Deliverer(r, wallet(hook.url, max_attempts=4), [7], "d2", base_backoff_s=0.01)
    until(lambda: settled(r, [7]), second.run_once)
    assert len(hook.of("down")) == 4
    assert dead_letters(r)["down"]["attempts"] == "4"


def test_a_live_deliverer_s_slow_attempts_are_not_claimed_by_another(clean_redis: Any, hook: Receiver) -> None:
    r = clean_redis
    hook.plans["slow"] = [(1.0, 200)]  # far longer than claim_idle_s: only the lease renewal protects it
    push(r, 3, action("slow"))
    slow = Deliverer(r, wallet(hook.url, timeout_s=3), [3], "d1", claim_idle_s=0.3, poll_s=0.01)
    th = threading.Thread(target=slow.run_forever)
    th.start()
    until(lambda: len(hook.of("slow")) == 1)  # d1 holds it (else d2 may read it first)
    other = Deliverer(r, wallet(hook.url), [3], "d2", claim_idle_s=0.3)
    try:
        until(lambda: slow.stats()["delivered"] == 1, other.run_once)
    finally:
        slow.stop()
        th.join(10)
    assert len(hook.of("slow")) == 1 and other.stats()["claimed"] == 0
    assert settled(r, [3])


def test_stream_targets_get_the_action_and_unknown_gameplays_are_dead_lettered(
    clean_redis: Any, hook: Receiver
) -> None:
    r = clean_redis
    push(r, 0, action("s1", "lottery.grant_chance"))
    push(r, 0, action("n1", "nowhere.grant"))
    r.xadd("playbus:{kg0}:outbox", {"action": b"not json"})
    targets = {"lottery": TargetConfig(stream="playbus:actions:lottery"), **wallet(hook.url)}
    Deliverer(r, targets, [0], "d1").run_once()
    [(_, fields)] = r.xrange("playbus:actions:lottery")
    assert json.loads(fields[b"action"]) == action("s1", "lottery.grant_chance")
    dead = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange("playbus:dead")]
    assert [e["error"] for e in dead] == [
        "no target configured for gameplay 'nowhere'",
        "outbox entry is not an action JSON with string 'id' and 'type'",
    ]
    assert settled(r, [0]) and hook.calls == []


_CRASHING_DELIVERER = """
import sys
import redis
from playbus.actors.service.delivery import Deliverer
from playbus.config.schema import TargetConfig
port, url = int(sys.argv[1]), sys.argv[2]
targets = {"wallet": TargetConfig(webhook=url, timeout_s=30)}
d = Deliverer(redis.Redis(port=port), targets, [0, 1, 2, 3], "doomed")
print("ready", flush=True)
d.run_forever()
"""


def test_a_crashed_deliverer_s_actions_are_delivered_by_another_with_the_same_ids(
    clean_redis: Any, redis_server: Any, hook: Receiver
) -> None:
    r = clean_redis
    ids = [f"a{i}" for i in range(60)]
    hung = ids[::10]
    for aid in hung:
        hook.plans[aid] = [(20.0, 200), (0, 200)]  # the doomed deliverer never sees these answered
    for i, aid in enumerate(ids):
        push(r, i % 4, action(aid))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_DELIVERER, str(redis_server.port), hook.url],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE)
    def pending() -> int:
        return sum(r.xpending(f"playbus:{{kg{kg}}}:outbox", GROUP)["pending"] for kg in range(4))

    try:  # every action tried once, the answered ones settled, the hung ones in flight: then crash
        until(lambda: all(hook.of(aid) for aid in ids) and pending() == len(hung), timeout=20)
    finally:
        proc.kill()  # SIGKILL: no settling, no cleanup
        proc.wait()
    assert pending() == len(hung)

    rescuer = Deliverer(r, wallet(hook.url), 4, "rescuer", claim_idle_s=0.2)
    until(lambda: settled(r, [0, 1, 2, 3]), rescuer.run_once)

    assert rescuer.stats()["claimed"] == len(hung)
    for aid in ids:
        calls = hook.of(aid)
        assert calls and all(c.key == aid and json.loads(c.body) == action(aid) for c in calls)
        assert len(calls) == (2 if aid in hung else 1)
    assert dead_letters(r) == {}


def test_bad_settings_are_refused(clean_redis: Any) -> None:
    with pytest.raises(DeliveryError, match="key_groups"):
        Deliverer(clean_redis, {}, [], "d1")
    with pytest.raises(DeliveryError, match="backoff"):
        Deliverer(clean_redis, {}, 1, "d1", base_backoff_s=5, max_backoff_s=1)


def test_conflict_locked_and_too_early_are_answers_worth_another_try(clean_redis: Any, hook: Receiver) -> None:
    r = clean_redis
    hook.plans.update({"conflict": [(0, 409), (0, 200)], "locked": [(0, 423), (0, 423), (0, 201)],
                       "early": [(0, 425), (0, 200)], "gone": [(0, 410)]})
    for i, aid in enumerate(hook.plans):
        push(r, i, action(aid))
    d = Deliverer(r, wallet(hook.url), [0, 1, 2, 3], "d1", base_backoff_s=0.01)
    until(lambda: settled(r, [0, 1, 2, 3]), d.run_once)
    assert {aid: len(hook.of(aid)) for aid in hook.plans} == {"conflict": 2, "locked": 3, "early": 2, "gone": 1}
    assert set(dead_letters(r)) == {"gone"}


def test_a_target_down_longer_than_the_backoff_schedule_gets_its_actions_once_it_is_back(
        clean_redis: Any, hook: Receiver) -> None:
    """The default is to retry for 24 h: an outage of the wallet (here 1.5 s, with a 0.1 s backoff cap that
    would have used up 8 attempts in under a second) dead-letters nothing."""
    r = clean_redis
    back_at = time.monotonic() + 1.5
    hook.plans["deploy"] = [(0, 503)] * 400 + [(0, 200)]
    push(r, 0, action("deploy"))
    d = Deliverer(r, wallet(hook.url), [0], "d1", base_backoff_s=0.01, max_backoff_s=0.1, poll_s=0.005)

    def step() -> None:
        if time.monotonic() >= back_at:
            hook.plans["deploy"] = [(0, 200)]
        d.run_once()

    until(lambda: settled(r, [0]), step, timeout=20)
    assert not dead_letters(r) and len(hook.of("deploy")) > 8
    assert hook.of("deploy")[-1].at >= back_at


def test_retry_for_bounds_how_long_an_action_is_retried_without_max_attempts(clean_redis: Any,
                                                                           hook: Receiver) -> None:
    r = clean_redis
    hook.plans["never"] = [(0, 503)]
    push(r, 1, action("never"))
    d = Deliverer(r, wallet(hook.url, retry_for="400ms"), [1], "d1", base_backoff_s=0.01, max_backoff_s=0.05,
                  poll_s=0.005)
    started = time.monotonic()
    until(lambda: "never" in dead_letters(r), d.run_once, timeout=10)
    calls = hook.of("never")
    assert calls[-1].at - calls[0].at >= 0.4 and time.monotonic() - started < 5
    assert int(dead_letters(r)["never"]["attempts"]) == len(calls) > 3


def test_headers_and_an_hmac_signature_of_the_exact_body_go_with_every_attempt(clean_redis: Any,
                                                                             hook: Receiver) -> None:
    import hashlib
    import hmac

    r = clean_redis
    hook.plans["signed"] = [(0, 500), (0, 200)]
    push(r, 2, action("signed"))
    targets = wallet(hook.url, headers={"Authorization": "Bearer wallet-token", "X-Tenant": "t1"}, secret="s3cret")
    d = Deliverer(r, targets, [2], "d1", base_backoff_s=0.01)
    until(lambda: settled(r, [2]), d.run_once)
    calls = hook.of("signed")
    assert len(calls) == 2
    for c in calls:
        assert c.headers["Authorization"] == "Bearer wallet-token" and c.headers["X-Tenant"] == "t1"
        expected = "sha256=" + hmac.new(b"s3cret", c.body, hashlib.sha256).hexdigest()
        assert c.headers["X-Playbus-Signature"] == expected
    assert calls[0].body == calls[1].body
