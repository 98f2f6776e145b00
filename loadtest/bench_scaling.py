"""Scaling on this machine: the partitioned stream path with 1, 2 and 4 shards (issue 11's figures).

Each shard count is a whole system started anew (ClusterBench), warmed with 10,000 events, then fed `n` events
through the input partitions (batches of 500); events/s from the first added to the last committed, and the CPU
each process group spends per event. This machine has 2 cores: past 2 shards the throughput is flat by
construction, and the CPU per event says which part saturates first.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run"]


def run(n: int, progress: Callable[[str], None], shard_counts: tuple[int, ...] = (1, 2, 4)) -> list[dict[str, Any]]:
    from playbus.loadtest.bench_cluster import ClusterBench, events
    from playbus.loadtest.cpu import CpuMeter

    out = []
    for shards in shard_counts:
        with tempfile.TemporaryDirectory(prefix=f"playbus-bench-{shards}-") as d, \
                ClusterBench(Path(d), shards=shards, users=10_000, rounds=1, progress=progress, warm=False) as b:
            b.run_stream(events(10_000, 10_000, f"warm{shards}-"), 500)
            b.meter.refresh()
            before = b.meter.sample()
            eps = b.run_stream(events(n, 10_000, f"scale{shards}-"), 500)
            cpu = CpuMeter.per_event(before, b.meter.sample(), n)
            row = {"shards": shards, "events_per_s": eps, "cpu_us_per_event": cpu}
            out.append(row)
            busy = ", ".join(f"{g} {v:.1f}" for g, v in cpu.items() if v >= 0.05)
            progress(f"  scaling    {shards} shard{'s' if shards > 1 else ''}: {eps:>9,.0f} events/s through the "
                     f"partitions; CPU us/event: {busy}")
    return out
