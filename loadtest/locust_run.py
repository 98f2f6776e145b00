"""`make loadtest`: locust, headless, against a playbus cluster that this starts (or one already running).

    python -m playbus.loadtest.locust_run                          # 50 users, 60 s, a 2-shard cluster of its own
    python -m playbus.loadtest.locust_run --users 200 --run-time 5m --out /tmp/lt
    python -m playbus.loadtest.locust_run --url http://127.0.0.1:8000 --redis-url redis://127.0.0.1:6379/0
    python -m playbus.loadtest.locust_run ... -- --processes 2     # anything after -- goes to locust as is

It starts `run_cluster.py --config CONFIG --shards N` (embedded Redis in a temp dir, a free port) with
`loadtest.launcher.ClusterProcess`, runs `locust -f loadtest/locustfile.py --headless` in a subprocess (the
gameplay users over HTTP, the stream producer into the cluster's Redis), printing a progress line every few
seconds from locust's stats history, then waits until the stream producer's events are all consumed, stops the
cluster (SIGTERM) and checks that it stopped cleanly.

It writes, in --out (default loadtest/results/locust/): locust's CSV files (locust_stats.csv,
locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv), its HTML report (report.html) and
summary.json (the figures of the summary line, and the checks).

Exit status 0 when: requests were made, the failure ratio is at most --max-fail-ratio, locust itself ended
normally, the streams were consumed with nothing in `playbus:rejected`, and the cluster stopped cleanly; 1
otherwise; 2 for bad arguments. This module does not import locust (only loadtest/locustfile.py does).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from playbus.actors.engine.keys import group_prefix
from playbus.actors.store.commit import REJECTED_STREAM
from playbus.client.streams import LAYOUT_KEY, partition_stream
from playbus.loadtest.launcher import ROOT, ClusterProcess, ClusterStartError

__all__ = ["LOCUSTFILE", "aggregated", "locust_command", "main", "parse_run_time", "read_stats"]

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
CSV_PREFIX = "locust"
HTML_NAME = "report.html"
STREAM_USER = "StreamProducerUser"
HTTP_USERS = ("QuizUser", "TaskUser", "CheckinUser", "AssistUser", "TeamUser")  # loadtest/locustfile.py


def parse_run_time(text: str) -> float:
    """locust's --run-time ("90", "90s", "2m", "1h30m") in seconds; ValueError when it is not one."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+)\s*([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text):
        raise ValueError(f"not a run time: {text!r} (e.g. 30s, 2m, 1h30m)")
    return float(sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))


def locust_command(url: str, out: Path, users: int, spawn_rate: float, run_time: str, user_classes: list[str],
                   extra: list[str], python: str = sys.executable) -> list[str]:
    """The headless locust run: CSV files and the HTML report in `out`, the final summary only."""
    return [python, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", f"{spawn_rate:g}",
            "-t", run_time, "--host", url, "--csv", str(out / CSV_PREFIX), "--html", str(out / HTML_NAME),
            "--only-summary", "--stop-timeout", "10", *extra, *user_classes]


def read_stats(path: Path) -> list[dict[str, str]]:
    """The rows of locust's <prefix>_stats.csv (one per request type and name, then "Aggregated")."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key) or 0)
    except ValueError:  # "N/A" when there is no response time yet
        return 0.0


def aggregated(rows: list[dict[str, str]]) -> dict[str, float]:
    """Requests, failures, req/s and latency percentiles (ms) of the "Aggregated" row (zeros if absent)."""
    row = next((r for r in rows if r.get("Name") == "Aggregated"), {})
    return {"requests": _num(row, "Request Count"), "failures": _num(row, "Failure Count"),
            "rps": _num(row, "Requests/s"), "p50_ms": _num(row, "50%"), "p95_ms": _num(row, "95%"),
            "p99_ms": _num(row, "99%"), "max_ms": _num(row, "Max Response Time")}


def summary_line(agg: dict[str, float], users: int, run_time: str) -> str:
    fail_pct = 100 * agg["failures"] / agg["requests"] if agg["requests"] else 0.0
    return (f"summary: {users} users for {run_time}: {agg['requests']:,.0f} requests, {agg['failures']:,.0f} "
            f"failures ({fail_pct:.2f}%), {agg['rps']:,.1f} req/s, p50 {agg['p50_ms']:.0f} ms, "
            f"p99 {agg['p99_ms']:.0f} ms")


class _Progress(threading.Thread):
    """Prints the newest "Aggregated" line of locust's stats history every `every_s` seconds."""

    def __init__(self, history: Path, every_s: float = 5.0) -> None:
        super().__init__(name="locust-progress", daemon=True)
        self.history = history
        self.every_s = every_s
        self.stop_flag = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop_flag.wait(self.every_s):
            row = self._last_row()
            if row is None or not _num(row, "Total Request Count"):
                continue
            print(f"[{time.monotonic() - t0:5.0f}s] users {row.get('User Count', '?')}: "
                  f"{_num(row, 'Total Request Count'):,.0f} requests, {_num(row, 'Total Failure Count'):,.0f} "
                  f"failures; now {_num(row, 'Requests/s'):,.1f} req/s, p50 {row.get('50%', '?')} ms, "
                  f"p99 {row.get('99%', '?')} ms", flush=True)

    def _last_row(self) -> dict[str, str] | None:
        try:
            rows = read_stats(self.history)
        except (OSError, csv.Error):
            return None
        agg = [r for r in rows if r.get("Name") == "Aggregated"]
        return agg[-1] if agg else None


def stream_backlog(redis_url: str) -> tuple[int, int]:
    """(input partitions with entries not consumed yet, entries in playbus:rejected) of playbus's Redis. A
    consumed partition's last entry is its committed offset (the commit trims the stream up to the offset)."""
    from playbus.actors.store.connect import connect

    r = connect(redis_url, socket_timeout=30)
    try:
        kg = int(r.hget(LAYOUT_KEY, "key_groups") or 0)
        pipe = r.pipeline(transaction=False)
        for g in range(kg):
            pipe.xrevrange(partition_stream(g), count=1)
            pipe.get(group_prefix(g) + "offset")
        replies = pipe.execute()
        behind = sum(1 for last, offset in zip(replies[::2], replies[1::2], strict=True)
                     if last and last[0][0] != offset)
        return behind, int(r.xlen(REJECTED_STREAM))
    finally:
        r.close()


def wait_streams(redis_url: str, timeout_s: float) -> tuple[int, int, float]:
    """Wait until every input partition is consumed: (partitions still behind, rejected entries, seconds)."""
    t = time.monotonic()
    while True:
        behind, rejected = stream_backlog(redis_url)
        if behind == 0 or time.monotonic() - t > timeout_s:
            return behind, rejected, round(time.monotonic() - t, 1)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m playbus.loadtest.locust_run",
                                description="locust, headless, against a playbus cluster (started here unless --url)",
                                epilog="Arguments after -- are passed to locust as they are.")
    p.add_argument("--users", "-u", type=int, default=50, help="locust users (default: %(default)s); one of them is "
                   "the stream producer when there is a Redis")
    p.add_argument("--spawn-rate", "-r", type=float, default=10, help="users started per second (default: %(default)s)")
    p.add_argument("--run-time", "-t", default="60s", help="how long, as locust takes it (default: %(default)s)")
    p.add_argument("--shards", type=int, default=2, help="shards of the cluster started here (default: %(default)s)")
    p.add_argument("--config", default="config/example.yaml", help="campaign config (default: %(default)s)")
    p.add_argument("--out", default="loadtest/results/locust", help="CSV, HTML and summary (default: %(default)s)")
    p.add_argument("--url", help="an already running playbus to load instead of starting one")
    p.add_argument("--redis-url", help="with --url: the Redis it uses, for the stream producer (none without it)")
    p.add_argument("--seed", help="seed of the virtual users (default: 0 for a cluster started here, else the clock)")
    p.add_argument("--max-fail-ratio", type=float, default=0.01,
                   help="fail when more than this share of requests failed (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=60,
                   help="seconds to wait for the streams to be consumed after the run (default: %(default)s)")
    p.add_argument("--cluster-log", action="store_true", help="echo run_cluster.py's output")
    args = p.parse_args(argv)
    try:
        run_s = parse_run_time(args.run_time)
    except ValueError as e:
        p.error(str(e))
    if args.users < 1 or args.spawn_rate <= 0:
        p.error("--users must be at least 1 and --spawn-rate positive")
    if args.redis_url and not args.url:
        p.error("--redis-url goes with --url (a cluster started here brings its own Redis)")

    config = Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob(f"{CSV_PREFIX}_*.csv"), out / HTML_NAME, out / "summary.json"]:
        old.unlink(missing_ok=True)

    cluster: ClusterProcess | None = None
    code = 0
    checks: dict[str, Any] = {}
    agg: dict[str, float] = aggregated([])
    rows: list[dict[str, str]] = []
    url = seed = ""
    try:
        if args.url:
            url, redis_url = args.url, args.redis_url or ""
            seed = args.seed or str(int(time.time()))
        else:
            echo = (lambda line: print(f"  | {line}", flush=True)) if args.cluster_log else None
            cluster = ClusterProcess(config, shards=args.shards, echo=echo)
            t = time.monotonic()
            print(f"starting run_cluster.py --config {args.config} --shards {args.shards} ...", flush=True)
            try:
                cluster.start()
            except ClusterStartError as e:
                print(f"the cluster did not start: {e}", flush=True)
                cluster = None  # start() killed whatever it had started
                return 1
            url, redis_url = cluster.url, cluster.redis_url
            seed = args.seed or "0"
            print(f"cluster up in {time.monotonic() - t:.1f} s at {url} (redis {redis_url})", flush=True)

        classes = [] if redis_url else list(HTTP_USERS)  # all of them, or all but the stream producer
        cmd = locust_command(url, out, args.users, args.spawn_rate, args.run_time, classes, extra)
        env = dict(os.environ, PLAYBUS_SEED=seed, PLAYBUS_CONFIG=str(config), PLAYBUS_REDIS_URL=redis_url,
                   PYTHONUNBUFFERED="1")
        print(f"locust: {args.users} users (spawn rate {args.spawn_rate:g}/s) for {args.run_time} against {url}, "
              f"seed {seed}" + ("" if redis_url else "; no Redis given: no stream producer"), flush=True)
        print("  $ " + " ".join(cmd[1:]), flush=True)
        progress = _Progress(out / f"{CSV_PREFIX}_stats_history.csv")
        progress.start()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
        try:
            locust_rc = proc.wait(run_s + 120)
        except subprocess.TimeoutExpired:
            print("locust did not end 120 s after its run time: stopping it", flush=True)
            proc.send_signal(signal.SIGTERM)
            try:
                locust_rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                locust_rc = proc.wait()
        except KeyboardInterrupt:
            print("interrupted: stopping locust (it writes its report)", flush=True)
            proc.send_signal(signal.SIGTERM)
            locust_rc = proc.wait(60)
            code = 1
        finally:
            progress.stop_flag.set()
        checks["locust_exit_code"] = locust_rc

        stats = out / f"{CSV_PREFIX}_stats.csv"
        if stats.exists():
            rows = read_stats(stats)
            agg = aggregated(rows)
        else:
            print(f"locust wrote no {stats}", flush=True)
        # locust exits 1 when any request failed (judged below by the ratio); anything else is locust failing.
        if locust_rc not in (0, 1):
            print(f"locust exited with {locust_rc}", flush=True)
            code = 1
        if agg["requests"] == 0:
            print("no request was made", flush=True)
            code = 1
        ratio = agg["failures"] / agg["requests"] if agg["requests"] else 0.0
        checks["fail_ratio"] = round(ratio, 6)
        if ratio > args.max_fail_ratio:
            print(f"failure ratio {ratio:.4f} above --max-fail-ratio {args.max_fail_ratio:g}; see "
                  f"{out / (CSV_PREFIX + '_failures.csv')}", flush=True)
            code = 1

        if redis_url:
            behind, rejected, waited = wait_streams(redis_url, args.drain_timeout)
            checks.update(streams_behind=behind, stream_rejected=rejected, drain_s=waited)
            print(f"streams: {'all consumed' if not behind else f'{behind} partitions NOT consumed'} "
                  f"{waited} s after the run; {rejected} entries in {REJECTED_STREAM}", flush=True)
            if behind or rejected:
                code = 1
    finally:
        if cluster is not None:
            rep = cluster.stop()
            checks["cluster_stop"] = rep.as_dict()
            print(f"cluster stop: exit code {rep.exit_code}, 'playbus: stopped' "
                  f"{'printed' if rep.stopped_line else 'MISSING'}, {rep.seconds} s"
                  + (", no exit within the stop timeout" if rep.timed_out else "")
                  + (f", leftover redis {rep.leftover_redis}" if rep.leftover_redis else "")
                  + (f", stragglers {rep.stragglers}" if rep.stragglers else ""), flush=True)
            if not rep.ok:
                print("cluster did not stop cleanly; output tail:\n" + cluster.output(40), flush=True)
                code = 1

    by_name = {f"{r['Type']} {r['Name']}": {"requests": int(_num(r, "Request Count")),
                                            "failures": int(_num(r, "Failure Count"))}
               for r in rows if r.get("Name") != "Aggregated"}
    summary = {"users": args.users, "spawn_rate": args.spawn_rate, "run_time": args.run_time, "seed": seed,
               "url": url, **agg, "by_name": by_name, "checks": checks, "ok": code == 0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"locust CSV: {out / CSV_PREFIX}_stats.csv (and _stats_history, _failures, _exceptions); "
          f"HTML report: {out / HTML_NAME}; summary: {out / 'summary.json'}", flush=True)
    print(summary_line(agg, args.users, args.run_time) + ("" if code == 0 else "  -> FAILED"), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
