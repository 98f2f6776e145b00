"""The cost of the events rules make, in the cluster benchmark's running system (bench_cluster.ClusterBench).

send     n `assist.helped` events through the partitioned stream, each of whose rule sends one `assist.credited` to
         another user, against 2n external `quiz.answered` events in the same round: the sent event runs the same
         rule as the external one (FIRST_QUIZ), so the difference in CPU per event is what the send itself costs
         (made in the sender's batch, written into the target's partition in the sender's commit, read, decided).
timers   a) 20,000 timers due over 10 s while other events flow (normal load): how late each fires (commit time
         minus due time); b) 100,000 timers due at the same millisecond (a campaign-wide deadline): how long until
         the last one fired. Fired timers run FIRST_QUIZ too.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from playbus.loadtest.cpu import CpuMeter

__all__ = ["ARM", "RELAY", "send_cost", "timer_lateness", "timers_at_once"]

RELAY = """
function decide(event, ctx)
  send(event.data.to, "assist.credited", {})
end
"""
ARM = """
function decide(event, ctx)
  later(event.data.delay, "timer.fire", {}, "deadline")
end
"""


def _evs(n: int, prefix: str, etype: str, users: int, ts: int, data: Any = None) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        e: dict[str, Any] = {"id": f"{prefix}{i}", "campaign": "spring2026", "user": f"{prefix}u{i % users}",
                             "type": etype, "ts": ts}
        d = data(i) if data is not None else None
        if d:
            e["data"] = d
        out.append(e)
    return out


def send_cost(b: Any, n: int) -> dict[str, Any]:
    """Each round: 2n external events, then n events that each send one; CPU per decided event, events/s."""
    from playbus.client import StreamProducer
    from playbus.loadtest.bench_engine import T0

    producer = StreamProducer(b.r, key_groups=128, batch=500)
    rounds: list[dict[str, Any]] = []
    for _ in range(b.rounds):
        b.meter.refresh()
        ext = _evs(2 * n, b._prefix("ext"), "quiz.answered", b.users, T0)
        before, target, t = b.meter.sample(), b.committed() + len(ext), time.perf_counter()
        producer.send_many(ext)
        b._wait_committed(target)
        ext_s, ext_cpu = time.perf_counter() - t, CpuMeter.per_event(before, b.meter.sample(), len(ext))
        p = b._prefix("snd")
        helped = _evs(n, p, "assist.helped", b.users, T0, lambda i, p=p: {"to": f"{p}v{i % b.users}"})
        before, target, t = b.meter.sample(), b.committed() + 2 * n, time.perf_counter()
        producer.send_many(helped)
        b._wait_committed(target)  # the n external events and the n events they sent
        snd_s, snd_cpu = time.perf_counter() - t, CpuMeter.per_event(before, b.meter.sample(), 2 * n)
        ext_us, pair_us = sum(ext_cpu.values()), 2 * sum(snd_cpu.values())  # per external event and its send
        rounds.append({"external_events_per_s": len(ext) / ext_s, "with_sends_events_per_s": 2 * n / snd_s,
                       "external_cpu_us": ext_us, "pair_cpu_us": pair_us, "send_cpu_us": pair_us - ext_us,
                       "send_over_external": (pair_us - ext_us) / ext_us, "external_cpu": ext_cpu,
                       "with_sends_cpu": snd_cpu})
    med = {k: statistics.median(float(r[k]) for r in rounds) for k in rounds[0] if not k.endswith("_cpu")}
    med["send_over_external"] = med["send_cpu_us"] / med["external_cpu_us"]  # of the medians, as they are shown
    return {**med, "events": n, "rounds": rounds}


def _late(b: Any) -> dict[str, float]:
    import ray

    late = sorted(x for got in ray.get([s.timer_lateness.remote() for s in b.shards]) for x in got)
    if not late:
        return {}
    return {"p50": late[len(late) // 2], "p99": late[int(len(late) * 0.99)], "max": late[-1], "fired": len(late)}


def _reset(b: Any) -> None:
    import ray

    ray.get([s.reset_stats.remote() for s in b.shards])


def timer_lateness(b: Any, n: int, seconds: float, background_per_s: float) -> dict[str, Any]:
    """n timers due evenly over `seconds` (from 2 s on), while `background_per_s` other events a second flow."""
    from playbus.client import StreamProducer

    _reset(b)
    producer = StreamProducer(b.r, key_groups=128, batch=500)
    now = int(time.time() * 1000)
    start = now + 2000
    arms = _evs(n, b._prefix("tl"), "timer.arm", n, now, lambda i: {"delay": start - now + int(i * seconds * 1000 / n)})
    target = b.committed() + 2 * n
    stop = threading.Event()
    sent = {"n": 0}

    def background() -> None:
        bg = StreamProducer(b.r, key_groups=128, batch=100)
        p = b._prefix("bg")
        t0 = time.perf_counter()
        while not stop.is_set():
            due = int((time.perf_counter() - t0) * background_per_s)
            if due > sent["n"]:
                bg.send_many(_evs(due - sent["n"], f"{p}{sent['n']}-", "quiz.answered", b.users,
                                  int(time.time() * 1000)))
                sent["n"] = due
            time.sleep(0.02)

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    try:
        producer.send_many(arms)
        deadline = time.monotonic() + seconds + 120
        while b.committed() < target + sent["n"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    late = _late(b)
    return {"timers": n, "over_s": seconds, "background_events_per_s": background_per_s,
            "background_events": sent["n"], "lateness_ms": late}


def timers_at_once(b: Any, n: int) -> dict[str, Any]:
    """n timers (n users) due at the same millisecond; how late the last one and the median fire."""
    from playbus.client import StreamProducer

    _reset(b)
    producer = StreamProducer(b.r, key_groups=128, batch=1000)
    now = int(time.time() * 1000)
    due = now + max(5000, n // 10)  # setting them takes about 3 s per 100,000 here
    arms = _evs(n, b._prefix("ta"), "timer.arm", n, now, lambda i: {"delay": due - now})
    target = b.committed() + 2 * n
    t = time.perf_counter()
    producer.send_many(arms)
    b._wait_committed(target - n)  # the arms are decided
    set_s = time.perf_counter() - t
    set_before_due = time.time() * 1000 < due
    b._wait_committed(target, timeout_s=600)
    last_ms = time.time() * 1000 - due
    return {"timers": n, "set_s": set_s, "set_before_due": set_before_due, "last_fired_after_due_ms": last_ms,
            "lateness_ms": _late(b)}
