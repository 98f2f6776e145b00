"""`make bench`: every benchmark of playbus in one run, each beside its baseline measured in the same run.

    python -m playbus.loadtest.bench [--quick] [--out DIR] [--readme README.md] [--skip engine|cluster]

1. engine   ShardEngine alone on one core, in interleaved rounds with the lupa floor (one Lua call per event, the
            event converted by table_from): 1 rule, 1 rule beside 50 rules on other event types, and a batch-size
            sweep (bench_engine.py).
2. cluster  the whole system started in this process: driver -> shards, the partitioned stream, playbus:in, HTTP
            (msgpack, B events a request), a single-event request at 50/s, Serve's own cost, one Ray call per
            event; each path in rounds, every round right after a run of the Redis Lua baseline (EVALSHA per
            event, pipelined); then 1,000,000 users' 10-key contexts in the shards' memory and a shard's reload
            of its users from Redis (bench_cluster.py).

Writes DIR/bench.json (every figure), DIR/throughput_vs_batch.png, DIR/latency.png, DIR/ratios.png and
DIR/bench.md (the table), and puts the table into the README between its `bench:begin`/`bench:end` marks.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playbus.loadtest import bench_cluster, bench_engine

__all__ = ["TARGETS", "main", "render_table", "run_engine"]

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# path -> (the target ratio, what it is measured against)
TARGETS: dict[str, tuple[float, str]] = {
    "stream": (1.5, "Redis Lua"),
    "shards": (1.5, "Redis Lua"),
    "http": (0.8, "Redis Lua"),
    "stream-in": (0.8, "Redis Lua"),
    "engine": (0.6, "table_from floor"),
}


def run_engine(quick: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """The engine beside the floor, batch by batch in turn, in rounds (CPU time of this process)."""
    import gc

    n = 40_000 if quick else 150_000
    rounds = 3 if quick else 5
    users = 10_000
    out: dict[str, Any] = {"events_per_round": n, "rounds": rounds, "users": users}
    say(f"engine benchmark: {n:,} events a round, {rounds} rounds, {users:,} users, batches of 500")
    gc.set_threshold(50_000, 50, 100)  # as in the shard actor
    with tempfile.TemporaryDirectory(prefix="playbus-bench-engine-") as d:
        tmp = Path(d)
        rule = [("first_quiz", bench_engine.FIRST_QUIZ)]
        one = bench_engine._engine(tmp, rule)
        fifty = bench_engine._engine(tmp, rule, other_rules=50)
        for eng in (one, fifty):
            eng.process(bench_engine.decoded(bench_engine._events(5000, users, "warm")), bench_engine.T0)
        rows = []
        for r in range(rounds):
            floor, e1, e50 = bench_engine.interleaved([one, fifty], n, users, 500, f"r{r}-")
            rows.append({"floor_events_per_s": floor, "engine_1_rule_events_per_s": e1,
                         "engine_50_other_rules_events_per_s": e50, "ratio": e1 / floor, "cost_of_50": e1 / e50 - 1})
            say(f"  round {r + 1}: floor {floor:,.0f}/s, engine 1 rule {e1:,.0f}/s ({e1 / floor:.2f}x), "
                f"with 50 rules on other types {e50:,.0f}/s ({(e1 / e50 - 1) * 100:+.1f}%)")
        out["rounds_detail"] = rows
        for k in ("floor_events_per_s", "engine_1_rule_events_per_s", "engine_50_other_rules_events_per_s",
                  "ratio", "cost_of_50"):
            out[k] = statistics.median(row[k] for row in rows)
        sweep = []
        for batch in (10, 50, 100, 500, 1000, 2000):
            eps = bench_engine.bench_engine(tmp, rule, n // 2, users, batch, engine=one, prefix=f"s{batch}-")
            sweep.append({"batch": batch, "events_per_s": eps})
        out["batch_sweep"] = sweep
        say("  batch sweep: " + ", ".join(f"{s['batch']}: {s['events_per_s']:,.0f}/s" for s in sweep))
    gc.set_threshold(700, 10, 10)
    say(f"  engine, 1 rule: {out['ratio']:.2f}x the table_from floor; 50 rules on other event types cost "
        f"{out['cost_of_50'] * 100:+.1f}%")
    return out


def _best(paths: list[dict[str, Any]], path: str) -> dict[str, Any] | None:
    rows = [p for p in paths if p["path"] == path]
    return max(rows, key=lambda p: p["ratio"]) if rows else None


def _param(path: str, param: int) -> str:
    if path in ("shards", "stream"):
        return f"batches of {param}"
    if path == "http":
        return f"{param} events a request"
    return "one event an entry"


def render_table(res: dict[str, Any]) -> str:
    """The README's table: each path's best batch size, its ratio to the baseline of the same run, the target."""
    lines = [f"`make bench` of {res['date']} on {res['machine']} ({res['seconds'] / 60:.0f} min); "
             f"the figures of every batch size are in `loadtest/results/bench.json`.", "",
             "| path | setting | events/s | baseline events/s | ratio | target | p50 / p99 (ms) |",
             "|---|---|---:|---:|---:|---:|---|"]
    cl = res.get("cluster")
    if cl:
        for path, label in (("stream", "partitioned stream, added -> committed"),
                            ("shards", "driver -> shards (durable commit)"), ("http", "HTTP, msgpack"),
                            ("stream-in", "`playbus:in`")):
            p = _best(cl["paths"], path)
            if p is None:
                continue
            target = TARGETS[path][0]
            mark = "met" if p["ratio"] >= target else "**not met**"
            lat = p.get("latency_ms") or {}
            lat_s = f"{lat['p50']:.0f} / {lat['p99']:.0f}" if lat else ""
            lines.append(f"| {label} | {_param(path, p['param'])} | {p['events_per_s']:,.0f} | "
                         f"{p['baseline_events_per_s']:,.0f} | {p['ratio']:.2f}x | {target}x ({mark}) | {lat_s} |")
    eng = res.get("engine")
    if eng:
        mark = "met" if eng["ratio"] >= TARGETS["engine"][0] else "**not met**"
        lines.append(f"| engine alone, 1 rule | batches of 500, one core | {eng['engine_1_rule_events_per_s']:,.0f} | "
                     f"{eng['floor_events_per_s']:,.0f} (table_from floor) | {eng['ratio']:.2f}x | 0.6x ({mark}) | |")
        mark = "met" if eng["cost_of_50"] < 0.10 else "**not met**"
        lines.append(f"| engine, + 50 rules on other types | | {eng['engine_50_other_rules_events_per_s']:,.0f} | | "
                     f"{eng['cost_of_50'] * 100:+.1f}% | < +10% ({mark}) | |")
    if cl:
        hs = cl["http_single"]
        mark = "met" if hs["p99"] < 50 else "**not met**"
        lines.append(f"| HTTP, one event a request | 50 requests/s, open loop | | | | p99 < 50 ms ({mark}) | "
                     f"{hs['p50']:.1f} / {hs['p99']:.1f} |")
        sn = cl["serve_noop"]
        lines.append(f"| Serve alone (a 404 from the ingress) | 4 clients | {sn['requests_per_s']:,.0f} requests/s "
                     f"| | | | {sn['p50']:.1f} / {sn['p99']:.1f} |")
        sp = cl.get("serve_noop_proxy")
        if sp:
            lines.append(f"| Serve's proxy (`--serve-proxy`), the same 404 | 4 clients | "
                         f"{sp['requests_per_s']:,.0f} requests/s | | | | {sp['p50']:.1f} / {sp['p99']:.1f} |")
        lines.append(f"| one Ray actor call per event (2nd baseline) | all in flight | "
                     f"{cl['actor_per_event_events_per_s']:,.0f} | | | | |")
        mem = cl["memory"]
        gib = mem["million_users_bytes"] / 2**30
        lines.append(f"| memory, 10-key contexts | {mem['users']:,} users through the shards | | | | 1M users <= 1 GB "
                     f"({'met' if mem['million_users_bytes'] <= 1e9 else '**not met**'}) | "
                     f"{mem['bytes_per_user']:,.0f} B a user, 1M users {gib:.2f} GiB |")
        rec = cl["recovery"]
        at_500k = rec["seconds"] * 500_000 / max(rec["users"], 1)
        lines.append(f"| recovery of a shard from Redis | {rec['users']:,} users | {rec['users_per_s']:,.0f} users/s "
                     f"| | | 500k users < 10 s ({'met' if at_500k < 10 else '**not met**'}) | {rec['seconds']:.1f} s |")
        sc = cl.get("send")
        if sc:
            lines.append(f"| a rule's `send` (an event for another user) | stream; each external event sends one | "
                         f"{sc['with_sends_events_per_s']:,.0f} decided | {sc['external_events_per_s']:,.0f} (external "
                         f"only) | a sent event costs {sc['send_over_external']:.2f}x an external one | | "
                         f"{sc['send_cpu_us']:.0f} us vs {sc['external_cpu_us']:.0f} us CPU |")
        tl = cl.get("timers")
        if tl and tl["lateness_ms"]:
            lt = tl["lateness_ms"]
            lines.append(f"| timers due over {tl['over_s']:.0f} s | {tl['timers']:,} timers beside "
                         f"{tl['background_events_per_s']:,.0f} events/s | | | | fired within 1 s "
                         f"({'met' if lt['max'] < 1000 else '**not met**'}) | lateness {lt['p50']:.0f} / "
                         f"{lt['p99']:.0f} (max {lt['max']:.0f}) |")
        ta = cl.get("timers_at_once")
        if ta and ta["lateness_ms"]:
            lines.append(f"| timers due at the same millisecond | {ta['timers']:,} users | "
                         f"{ta['timers'] / max(ta['last_fired_after_due_ms'] / 1000, 1e-3):,.0f} fired/s | | | | "
                         f"last {ta['last_fired_after_due_ms'] / 1000:.1f} s after due; lateness "
                         f"{ta['lateness_ms']['p50']:.0f} / {ta['lateness_ms']['p99']:.0f} |")
        ops = cl.get("ops")
        if ops:
            a, pz, rp = ops["activate"], ops["pause"], ops["replay"]
            first = a["first_event_on_it_ms"]
            met_a = "met" if first["max"] < 1000 else "**not met**"
            met_p = "met" if pz["call_ms"]["max"] < 1000 else "**not met**"
            lines.append(f"| activating a script version | beside {a['background_events_per_s']:,.0f} events/s | | | "
                         f"| every shard within 1 s ({met_a}) | call {a['call_ms']['median']:.0f} ms; first event on "
                         f"it {first['median']:.0f} (max {first['max']:.0f}) |")
            lines.append(f"| pausing / resuming a campaign | beside {pz['background_events_per_s']:,.0f} events/s | "
                         f"| | | within 1 s ({met_p}) | call {pz['call_ms']['median']:.0f} ms (max "
                         f"{pz['call_ms']['max']:.0f}) |")
            lines.append(f"| replaying failed runs (补单) | {rp['runs']:,} runs | {rp['runs_per_s']:,.0f} runs/s | | | "
                         f"| {rp['seconds']:.1f} s |")
            rs = ops.get("rescale")
            for r in rs["rescales"] if rs else ():
                met_r = "met" if r["seconds"] < 60 and not rs["partitions_behind_after"] else "**not met**"
                lines.append(f"| rescaling to {r['to']} shards | beside {rs['background_events_per_s']:,.0f} events/s, "
                             f"{r['moved_groups']} key groups move | | | | within 60 s, nothing behind ({met_r}) | "
                             f"{r['seconds']:.1f} s; the groups paused {r['pause_ms']:.0f} ms |")
        for row in cl.get("scaling", ()):
            cpu = row["cpu_us_per_event"]
            lines.append(f"| partitioned stream, {row['shards']} shard{'s' if row['shards'] > 1 else ''} | batches of "
                         f"500, a cluster of its own | {row['events_per_s']:,.0f} | | | | CPU us/event: shards "
                         f"{cpu.get('shards', 0):.1f}, redis {cpu.get('redis', 0):.1f}, driver "
                         f"{cpu.get('driver', 0):.1f} |")
    lines += ["", "![throughput against batch size](loadtest/results/throughput_vs_batch.png)",
              "![ratio to the baseline](loadtest/results/ratios.png)", "![latency](loadtest/results/latency.png)"]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    """The PNG plots: throughput of each path against batch size, ratios to the baseline, latency percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    cl = res.get("cluster")
    fig, ax = plt.subplots(figsize=(8, 5))
    if cl:
        for path, marker in (("shards", "o"), ("stream", "s"), ("http", "^")):
            rows = sorted((p for p in cl["paths"] if p["path"] == path), key=lambda p: p["param"])
            if rows:
                ax.plot([p["param"] for p in rows], [p["events_per_s"] for p in rows], marker=marker,
                        label=f"{path}" + (" (events a request)" if path == "http" else ""))
        base = [r["baseline_events_per_s"] for p in cl["paths"] for r in p["rounds"]]
        ax.axhline(statistics.median(base), color="grey", linestyle="--", label="Redis Lua baseline (median)")
        si = _best(cl["paths"], "stream-in")
        if si:
            ax.axhline(si["events_per_s"], color="tab:red", linestyle=":", label="playbus:in, one event an entry")
    if res.get("engine"):
        sweep = res["engine"]["batch_sweep"]
        ax.plot([s["batch"] for s in sweep], [s["events_per_s"] for s in sweep], marker="x", color="black",
                label="engine alone (one core)")
    ax.set_xscale("log")
    ax.set_xlabel("batch size (events)")
    ax.set_ylabel("events/s")
    ax.set_title("playbus throughput against batch size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(out / "throughput_vs_batch.png")
    fig.savefig(made[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    names, ratios, targets = [], [], []
    if cl:
        for path in ("stream", "shards", "http", "stream-in"):
            p = _best(cl["paths"], path)
            if p:
                names.append(f"{path}\n({_param(path, p['param'])})")
                ratios.append(p["ratio"])
                targets.append(TARGETS[path][0])
    if res.get("engine"):
        names.append("engine\n(vs table_from floor)")
        ratios.append(res["engine"]["ratio"])
        targets.append(TARGETS["engine"][0])
    bars = ax.bar(names, ratios, color=["tab:green" if r >= t else "tab:orange" for r, t in zip(ratios, targets,
                                                                                                strict=True)])
    ax.scatter(names, targets, marker="_", s=800, color="black", label="target", zorder=3)
    ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("ratio to the baseline of the same run")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(out / "ratios.png")
    fig.savefig(made[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    labels, p50, p99 = [], [], []
    if cl:
        for p in cl["paths"]:
            if p.get("latency_ms"):
                labels.append(f"{p['path']} {p['param']}")
                p50.append(p["latency_ms"]["p50"])
                p99.append(p["latency_ms"]["p99"])
        labels.append("http, 1 event\n50 req/s")
        p50.append(cl["http_single"]["p50"])
        p99.append(cl["http_single"]["p99"])
        for label, key in (("serve 404", "serve_noop"), ("serve 404\nvia proxy", "serve_noop_proxy")):
            if key in cl:
                labels.append(label)
                p50.append(cl[key]["p50"])
                p99.append(cl[key]["p99"])
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
    ax.set_xticks(list(xs), labels, fontsize=7, rotation=30)
    ax.set_ylabel("ms (a batch or a request)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(out / "latency.png")
    fig.savefig(made[-1], dpi=100)
    plt.close(fig)
    return made


def put_in_readme(readme: Path, table: str) -> bool:
    """Replace what is between the README's bench marks with `table`; False if the marks are missing."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and fewer batch sizes (a smoke run)")
    p.add_argument("--out", default=str(ROOT / "loadtest" / "results"), help="where the JSON, plots and table go")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="README to put the table in ('' for none)")
    p.add_argument("--skip", action="append", default=[], choices=["engine", "cluster"])
    p.add_argument("--rounds", type=int, default=3, help="rounds of each cluster path")
    p.add_argument("--memory-users", type=int, help="users of the memory measurement (default 1,000,000)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def say(s: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True)

    t0 = time.perf_counter()
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick,
                           "machine": f"{platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}"}
    if "engine" not in args.skip:
        res["engine"] = run_engine(args.quick, say)
    if "cluster" not in args.skip:
        res["cluster"] = bench_cluster.run(args.quick, rounds=args.rounds, memory_users=args.memory_users,
                                           progress=say)
    res["seconds"] = time.perf_counter() - t0
    (out / "bench.json").write_text(json.dumps(res, indent=1))
    table = render_table(res)
    (out / "bench.md").write_text(table)
    plots = plot(res, out)
    say(f"results: {out / 'bench.json'}, {out / 'bench.md'}, " + ", ".join(str(x) for x in plots))
    if args.readme and put_in_readme(Path(args.readme), table):
        say(f"the table is in {args.readme}")
    print(table, flush=True)
    return res


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    main(sys.argv[1:])
