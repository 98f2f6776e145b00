"""Operating a running campaign under load, measured in the cluster benchmark's system (bench_cluster.ClusterBench).

activate  while a producer streams events into the partitions, a script version is activated (alternating between
          two) through the admin API: how long the call takes (it returns once every shard runs the version) and
          how long until an event posted right after it is decided by the new version
pause     the same for a pause and a resume (a kill switch)
rescale   while the producer streams, the shards go 2 -> 4 -> 2 (POST /v1/shards, then the supervisor's move):
          how long each rescale takes and how long the moving key groups take no events (the pause)
replay    N failed rule runs replayed (补单) on a fixed version: runs replayed per second
backtest  the campaign's last N recorded events, active version against a candidate: events per second
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import urllib.request
from typing import Any

__all__ = ["TOKEN", "activation_under_load", "pause_under_load", "replay_speed", "rescale_under_load"]

TOKEN = "bench-admin-token"  # what bench_cluster sets PLAYBUS_ADMIN_TOKEN to when it is unset
V2 = """
function decide(event, ctx)
  local n = ctx:incr("quiz.answered", 1)
  if n == 1 then emit("lottery.grant_chance", {chances = 2}) end
end
"""


def _http(b: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(b.url + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {os.environ.get('PLAYBUS_ADMIN_TOKEN', TOKEN)}",
                                          "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class _Load:
    """A producer streaming `rate` quiz events a second into the partitions until stopped."""

    def __init__(self, b: Any, rate: float) -> None:
        self.b, self.rate, self.sent = b, rate, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from playbus.client import StreamProducer
        from playbus.loadtest.bench_cluster import events

        producer = StreamProducer(self.b.r, key_groups=128, batch=200)
        prefix = self.b._prefix("load")
        t0 = time.perf_counter()
        while not self.stop.is_set():
            due = int((time.perf_counter() - t0) * self.rate)
            if due > self.sent:
                producer.send_many(events(due - self.sent, self.b.users, f"{prefix}{self.sent}-"))
                self.sent = due
            time.sleep(0.01)

    def __enter__(self) -> _Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _decided_by(b: Any, tag: str) -> int:
    """Post one first quiz answer of a new user; the script version that granted its chance."""
    from playbus.loadtest.bench_engine import T0

    ev = {"id": tag, "campaign": "spring2026", "user": tag, "type": "quiz.answered", "ts": T0}
    status, doc = _http(b, "POST", "/v1/events", [ev])
    assert status == 200, doc
    return int(doc["results"][0]["actions"][0]["script_version"])


def activation_under_load(b: Any, rate: float, times: int = 6) -> dict[str, Any]:
    status, doc = _http(b, "PUT", "/v1/scripts/first_quiz_lottery", V2.encode())
    assert status in (201, 422), doc  # 422: vectors refuse it (none here)
    calls, first = [], []
    with _Load(b, rate) as load:
        time.sleep(1.0)
        for i in range(times):
            version = 2 if i % 2 == 0 else 1
            t = time.perf_counter()
            status, doc = _http(b, "POST", "/v1/scripts/first_quiz_lottery/activate", {"version": version})
            calls.append((time.perf_counter() - t) * 1000)
            assert status == 200, doc
            n = 0
            while _decided_by(b, f"act{b._prefix('a')}{n}") != version:
                n += 1
            first.append((time.perf_counter() - t) * 1000)
            time.sleep(0.5)
        sent = load.sent
    _http(b, "POST", "/v1/scripts/first_quiz_lottery/activate", {"version": 1})
    return {"background_events_per_s": rate, "background_events": sent, "activations": times,
            "call_ms": {"median": statistics.median(calls), "max": max(calls)},
            "first_event_on_it_ms": {"median": statistics.median(first), "max": max(first)}}


def pause_under_load(b: Any, rate: float, times: int = 4) -> dict[str, Any]:
    calls = []
    with _Load(b, rate):
        time.sleep(0.5)
        for i in range(times):
            op = "pause" if i % 2 == 0 else "resume"
            t = time.perf_counter()
            status, doc = _http(b, "POST", f"/v1/campaigns/spring2026/{op}")
            calls.append((time.perf_counter() - t) * 1000)
            assert status == 200, doc
            time.sleep(0.3)
    _http(b, "POST", "/v1/campaigns/spring2026/resume")
    return {"background_events_per_s": rate, "calls": times,
            "call_ms": {"median": statistics.median(calls), "max": max(calls)}}


def rescale_under_load(b: Any, rate: float, counts: tuple[int, ...] = (4, 2)) -> dict[str, Any]:
    """Rescale to each of `counts` in turn under the load; the supervisor's part (run_cluster's watchdog round)
    is called here. At the end every input partition is consumed (checked: the count of those behind)."""
    out: list[dict[str, Any]] = []
    with _Load(b, rate) as load:
        time.sleep(1.0)
        for count in counts:
            t = time.perf_counter()
            status, doc = _http(b, "POST", "/v1/shards", {"count": count})
            assert status == 202, doc
            b.cluster.rescale_if_asked()
            status, doc = _http(b, "GET", "/v1/shards")
            assert status == 200 and doc["count"] == count and not doc["last"]["problems"], doc
            out.append({"to": count, "seconds": time.perf_counter() - t, "pause_ms": doc["last"]["pause_ms"],
                        "moved_groups": doc["last"]["moved_groups"], "users_dropped": doc["last"]["users_dropped"]})
            time.sleep(1.0)
        sent = load.sent
    end = time.monotonic() + 60
    behind = _partitions_behind(b)
    while behind and time.monotonic() < end:
        time.sleep(0.2)
        behind = _partitions_behind(b)
    return {"background_events_per_s": rate, "background_events": sent, "partitions_behind_after": behind,
            "rescales": out}


def _partitions_behind(b: Any, key_groups: int = 128) -> int:
    """Input partitions whose committed offset is short of their last entry."""
    pipe = b.r.pipeline(transaction=False)
    for kg in range(key_groups):
        pipe.xinfo_stream(f"playbus:{{kg{kg}}}:in")
        pipe.get(f"playbus:{{kg{kg}}}:offset")
    got = pipe.execute(raise_on_error=False)
    behind = 0
    for info, offset in zip(got[::2], got[1::2], strict=True):
        if isinstance(info, Exception):
            continue  # no partition (nothing sent to the group)
        last = info["last-generated-id"]
        last = last.decode() if isinstance(last, bytes) else last
        off = offset.decode() if isinstance(offset, bytes) else (offset or "0-0")
        if tuple(map(int, off.split("-"))) < tuple(map(int, last.split("-"))):
            behind += 1
    return behind


def replay_speed(b: Any, n: int) -> dict[str, Any]:
    """n rule runs fail (a campaign put through the API, its script failing), then the fixed version is activated
    and the failed runs replayed."""
    from playbus.client import StreamProducer
    from playbus.loadtest.bench_engine import T0

    broken = 'function decide(e, ctx) if not e.data.ok then error("no ok") end ' \
             'emit("lottery.grant_chance", {chances = 1}) end'
    assert _http(b, "PUT", "/v1/scripts/bench_flaky", broken.encode())[0] == 201
    doc = {"timezone": "UTC", "starts": "2026-01-01T00:00:00+00:00", "ends": "2028-01-01T00:00:00+00:00",
           "rules": [{"id": "flaky", "on": "quiz.answered", "script": "bench_flaky",
                      "emits": ["lottery.grant_chance"]}]}
    status, got = _http(b, "PUT", "/v1/campaigns/bench_replay", doc)
    assert status in (200, 201), got
    p = b._prefix("rp")
    target = b.committed() + n
    StreamProducer(b.r, key_groups=128, batch=500).send_many(
        {"id": f"{p}{i}", "campaign": "bench_replay", "user": f"{p}u{i}", "type": "quiz.answered", "ts": T0}
        for i in range(n))
    b._wait_committed(target)
    fixed = broken.replace('if not e.data.ok then error("no ok") end ', "")
    status, pushed = _http(b, "PUT", "/v1/scripts/bench_flaky", fixed.encode())
    assert status == 201, pushed
    assert _http(b, "POST", "/v1/scripts/bench_flaky/activate", {"version": pushed["version"]})[0] == 200
    t = time.perf_counter()
    status, res = _http(b, "POST", "/v1/failed/replay", {"campaign": "bench_replay", "rule": "flaky"})
    seconds = time.perf_counter() - t
    assert status == 200 and res["replayed"] == res["found"] == n, res
    return {"runs": n, "seconds": seconds, "runs_per_s": n / seconds}
