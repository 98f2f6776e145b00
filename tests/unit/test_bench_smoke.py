"""The engine benchmark runs end to end on tiny sizes (its figures are for `make bench`, not asserted here); the
bench's table says which targets are met, goes into the README between its marks, and the plots are drawn."""

from __future__ import annotations

from pathlib import Path

from playbus.loadtest import bench, bench_engine


def test_engine_benchmark_runs_and_reports_every_figure() -> None:
    out = bench_engine.main(["--events", "2000", "--users", "100", "--memory-users", "2000"])
    for key in ("floor_events_per_s", "floor_table_from_events_per_s", "engine_1_rule_events_per_s",
                "engine_3_rules_events_per_s", "total_bytes_per_user", "full_window_total_bytes_per_user"):
        assert out[key] > 0, key
    # a remembered event id costs its 8-byte digest and its 4-byte receive time
    assert out["full_window_python_bytes_per_user"] > out["python_bytes_per_user"] + 31 * 12 * 0.9
    assert 11 <= out["dedup_bytes_per_id"] <= 14


def _result(stream_ratio: float, p99: float) -> dict[str, object]:
    def path(name: str, param: int, ratio: float) -> dict[str, object]:
        return {"path": name, "param": param, "events_per_s": 1000 * ratio, "baseline_events_per_s": 1000.0,
                "ratio": ratio, "rounds": [{"events_per_s": 1000 * ratio, "baseline_events_per_s": 1000.0,
                                            "ratio": ratio}], "cpu_us_per_event": {}, "latency_ms": {}}

    return {"date": "2026-11-30", "machine": "test", "seconds": 60, "engine": {
        "engine_1_rule_events_per_s": 200.0, "floor_events_per_s": 400.0, "ratio": 0.5, "cost_of_50": 0.02,
        "engine_50_other_rules_events_per_s": 196.0, "batch_sweep": [{"batch": 10, "events_per_s": 100.0},
                                                                     {"batch": 500, "events_per_s": 200.0}]},
        "cluster": {"paths": [path("stream", 100, 1.2), path("stream", 500, stream_ratio), path("shards", 500, 1.6),
                              path("http", 500, 0.9), path("stream-in", 1, 0.5)],
                    "http_single": {"p50": 3.0, "p90": 5.0, "p99": p99, "max": 60.0},
                    "serve_noop": {"requests_per_s": 1000.0, "p50": 2.0, "p99": 9.0},
                    "serve_noop_proxy": {"requests_per_s": 95.0, "p50": 40.0, "p99": 80.0},
                    "actor_per_event_events_per_s": 1700.0,
                    "memory": {"users": 1000, "bytes_per_user": 900.0, "million_users_bytes": 9e8},
                    "recovery": {"users": 50_000, "seconds": 0.5, "users_per_s": 100_000.0}}}


def test_the_table_takes_each_paths_best_setting_and_says_which_targets_are_met(tmp_path: Path) -> None:
    table = bench.render_table(_result(stream_ratio=1.7, p99=20.0))
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "batches of 500" in rows["partitioned stream, added -> committed"]
    assert "1.70x | 1.5x (met)" in rows["partitioned stream, added -> committed"]
    assert "0.50x | 0.8x (**not met**)" in rows["`playbus:in`"]
    assert "0.50x | 0.6x (**not met**)" in rows["engine alone, 1 rule"]
    assert "+2.0% | < +10% (met)" in rows["engine, + 50 rules on other types"]
    assert "p99 < 50 ms (met)" in rows["HTTP, one event a request"]
    assert "(met)" in rows["memory, 10-key contexts"]
    assert "(met)" in rows["recovery of a shard from Redis"]
    assert "95 requests/s" in rows["Serve's proxy (`--serve-proxy`), the same 404"]
    worse = bench.render_table(_result(stream_ratio=1.0, p99=80.0))
    assert "1.20x | 1.5x (**not met**)" in worse  # the best of the two batch sizes, and it is short
    assert "p99 < 50 ms (**not met**)" in worse


def test_the_table_goes_between_the_readme_marks_and_the_plots_are_drawn(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{bench.BEGIN}\nold table\n{bench.END}\n\nafter\n")
    assert bench.put_in_readme(readme, "| new |\n")
    assert readme.read_text() == f"# x\n\n{bench.BEGIN}\n| new |\n{bench.END}\n\nafter\n"
    assert bench.put_in_readme(readme, "| newer |\n")  # a second run replaces the table, marks kept
    assert readme.read_text() == f"# x\n\n{bench.BEGIN}\n| newer |\n{bench.END}\n\nafter\n"
    (tmp_path / "plain.md").write_text("no marks\n")
    assert not bench.put_in_readme(tmp_path / "plain.md", "| new |\n")
    made = bench.plot(_result(1.7, 20.0), tmp_path)
    assert [p.name for p in made] == ["throughput_vs_batch.png", "ratios.png", "latency.png"]
    for p in made:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
