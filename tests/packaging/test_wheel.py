"""The packages as users install them, outside the checkout: the server wheel in a fresh virtualenv (playbus and
run_cluster work, nothing shadows a service's own `config` or `actors`), and the client alone without Ray or lupa.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from playbus.actors.service.console import CONSOLE_DIR
from playbus.actors.store.server import RedisServer
from playbus.loadtest.launcher import ClusterProcess, http_get

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(cmd: list[str | Path], cwd: Path, timeout: float = 600, check: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # A neutral environment: nothing of the checkout on the path, no virtualenv of ours active.
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**base, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def _fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin"


def _wheel(project: Path, out: Path) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, project], cwd=out)
    return next(out.glob("*.whl"))


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(bin folder, a neutral working folder) of a fresh virtualenv with the server wheel installed."""
    base = tmp_path_factory.mktemp("wheel")
    wheel = _wheel(ROOT, base)
    bin_ = _fresh_venv(base / "venv")
    _run([bin_ / "python", "-m", "pip", "install", "-q", wheel], cwd=base)
    work = base / "work"
    work.mkdir()
    yield bin_, work


def test_the_wheel_installs_only_the_playbus_package_with_its_lua_and_example(server_venv: tuple[Path, Path]) -> None:
    bin_, work = server_venv
    probe = (
        "import importlib.util as u, json, playbus, pathlib; "
        "root = pathlib.Path(playbus.__file__).parent; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in ('config', 'actors', 'scripting', 'loadtest')} | "
        "{'files': sorted(str(p.relative_to(root)) for p in root.rglob('*.lua')), "
        "'console': sorted(p.name for p in (root / 'actors' / 'service' / 'console').glob('*'))}))"
    )
    found = json.loads(_run([bin_ / "python", "-c", probe], cwd=work).stdout)
    assert not any(found[m] for m in ("config", "actors", "scripting", "loadtest")), found
    for lua in ("scripting/driver.lua", "actors/store/commit.lua", "actors/store/lease.lua",
                "config/scripts/first_quiz_lottery.lua"):
        assert lua in found["files"], found["files"]
    # GET /ui/: the operators' console, every file of it
    assert found["console"] == sorted(p.name for p in CONSOLE_DIR.iterdir()), found["console"]


def test_playbus_dry_run_of_the_packaged_example_from_outside_the_checkout(server_venv: tuple[Path, Path]) -> None:
    bin_, work = server_venv
    events = ROOT / "config" / "example-events.jsonl"
    p = _run([bin_ / "playbus", "dry-run", "--events", events, "--now", "1769000000000"], cwd=work)
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    # one line per input event, and one per event its rules made (sends, timers fired), which says so
    assert len([x for x in lines if "made" not in x]) == sum(1 for line in events.read_text().splitlines()
                                                             if line.strip())
    assert {x["made"]["via"] for x in lines if "made" in x} == {"send", "timer"}
    first_quiz = next(r for r in lines if r["actions"] and r["actions"][0]["rule"] == "first_quiz_lottery")
    assert first_quiz["actions"][0]["type"] == "lottery.grant_chance"
    assert first_quiz["context"]["quiz.answered"] == 1
    bad = _run([bin_ / "playbus", "dry-run", "--config", work / "missing.yaml", "--events", events], cwd=work,
               check=False)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr


@pytest.mark.ray
def test_run_cluster_from_the_wheel_serves_events(server_venv: tuple[Path, Path]) -> None:
    bin_, work = server_venv
    where = "import playbus.config, pathlib; print(pathlib.Path(playbus.config.__file__).parent / 'example.yaml')"
    config = Path(_run([bin_ / "python", "-c", where], cwd=work).stdout.strip())
    with ClusterProcess(config, shards=2, cwd=work, command=[str(bin_ / "run_cluster")]) as cluster:
        import http.client

        conn = http.client.HTTPConnection(cluster.host, cluster.port, timeout=60)
        body = json.dumps({"id": "wheel-1", "campaign": "spring2026", "user": "u1", "type": "quiz.answered",
                           "ts": 1769000000000})
        conn.request("POST", "/v1/events", body, {"content-type": "application/json"})
        reply = json.loads(conn.getresponse().read())
        assert reply["results"][0]["status"] == "applied", reply
        assert reply["results"][0]["actions"][0]["type"] == "lottery.grant_chance"
        status, ctx = http_get(cluster.host, cluster.port, "/v1/campaigns/spring2026/users/u1/context")
        assert status == 200 and json.loads(ctx)["context"] == {"quiz.answered": 1}
        # the described API, and its rendered reference with Swagger UI's files from the installed dependency
        status, spec = http_get(cluster.host, cluster.port, "/openapi.json")
        assert status == 200 and json.loads(spec)["openapi"].startswith("3.1")
        status, js = http_get(cluster.host, cluster.port, "/docs/assets/swagger-ui-bundle.js")
        assert status == 200 and b"SwaggerUIBundle" in js
        # the operators' console, from the package's files
        status, page = http_get(cluster.host, cluster.port, "/ui/")
        assert status == 200 and b'src="/ui/app.js"' in page
        status, js = http_get(cluster.host, cluster.port, "/ui/app.js")
        assert status == 200 and b"onUnauthorized" in js
    assert cluster.stop_report is not None and cluster.stop_report.ok, cluster.stop_report


def test_the_client_distribution_needs_neither_ray_nor_lupa(tmp_path: Path) -> None:
    wheel = _wheel(ROOT / "clients" / "python", tmp_path)
    bin_ = _fresh_venv(tmp_path / "venv")
    _run([bin_ / "python", "-m", "pip", "install", "-q", wheel], cwd=tmp_path)
    with RedisServer(tmp_path / "redis") as server:
        probe = (
            "import importlib.util as u, json, redis; from playbus.client import PlaybusClient, StreamProducer; "
            f"ids = StreamProducer(redis.Redis(port={server.port}), key_groups=1).send_many("
            "[{'id': 'e1', 'campaign': 'c', 'user': 'u', 'type': 't'}]); "
            "print(json.dumps({'ray': u.find_spec('ray') is not None, 'lupa': u.find_spec('lupa') is not None, "
            "'cli': u.find_spec('playbus.cli') is not None, 'added': len(ids)}))"
        )
        found = json.loads(_run([bin_ / "python", "-c", probe], cwd=tmp_path / "venv").stdout)
        assert found == {"ray": False, "lupa": False, "cli": False, "added": 1}
        assert server.client().xlen("playbus:{kg0}:in") == 1
