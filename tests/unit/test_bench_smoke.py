"""The engine benchmark runs end to end on tiny sizes (its figures are for `make bench`, not asserted here)."""

from __future__ import annotations

from playbus.loadtest import bench_engine


def test_engine_benchmark_runs_and_reports_every_figure() -> None:
    out = bench_engine.main(["--events", "2000", "--users", "100", "--memory-users", "200"])
    for key in ("floor_events_per_s", "floor_table_from_events_per_s", "engine_1_rule_events_per_s",
                "engine_3_rules_events_per_s", "total_bytes_per_user", "full_window_total_bytes_per_user"):
        assert out[key] > 0, key
    # a remembered event id costs its 8-byte digest and its 4-byte receive time
    assert out["full_window_python_bytes_per_user"] > out["python_bytes_per_user"] + 31 * 12 * 0.9
    assert 11 <= out["dedup_bytes_per_id"] <= 14
