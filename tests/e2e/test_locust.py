"""`make loadtest` end to end: `python -m playbus.loadtest.locust_run` starts its own cluster of config/example.yaml,
runs locust headless (every gameplay user over HTTP and the stream producer), checks the streams were consumed,
stops the cluster cleanly and writes locust's CSV and HTML report. One cluster start; not the session fixture.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from playbus.loadtest.locust_run import HTTP_USERS
from tests.e2e.conftest import PYTHON, ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

GAMEPLAYS = ("quiz", "task", "checkin", "assist", "team")


def test_make_loadtest_runs_locust_against_a_cluster_it_starts(tmp_path: Path) -> None:
    p = subprocess.run([str(PYTHON), "-m", "playbus.loadtest.locust_run", "--run-time", "8s", "--users", "6",
                        "--spawn-rate", "6", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=280)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]

    with (tmp_path / "locust_stats.csv").open(newline="") as f:
        rows = {f"{r['Type']} {r['Name']}".strip(): r for r in csv.DictReader(f)}
    assert len(HTTP_USERS) == len(GAMEPLAYS)
    for g in GAMEPLAYS:  # -u 6: one user of each class (locust spawns every class once first)
        assert int(rows[f"POST /v1/events {g}"]["Request Count"]) > 0, rows.keys()
    assert int(rows["XADD playbus:{kg*}:in record batches"]["Request Count"]) > 0, rows.keys()
    assert int(rows["Aggregated"]["Request Count"]) > 0
    assert all(int(r["Failure Count"]) == 0 for r in rows.values()), out[-5000:]
    assert (tmp_path / "report.html").stat().st_size > 10_000

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["failures"] == 0 and summary["requests"] > 0
    assert summary["checks"]["streams_behind"] == 0 and summary["checks"]["stream_rejected"] == 0
    assert summary["checks"]["cluster_stop"]["ok"]
    assert "summary: 6 users for 8s:" in p.stdout and "HTML report:" in p.stdout
