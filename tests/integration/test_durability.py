"""What `applied` waits for, observed on a real redis-server: with `appendfsync always` (what playbus requires for
`durability: {fsync: always}` on Redis 7.0, which has no WAITAOF) the AOF is fsynced between a commit being sent
and its reply; with `everysec` it is not, and it is fsynced within about a second. A SIGKILL of redis-server
cannot show this (the kernel keeps what was written), so an LD_PRELOAD probe records the server's fsyncs."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from playbus.actors.engine.engine import ShardEngine
from playbus.actors.store.commit import RedisStore
from playbus.actors.store.server import RedisServer
from playbus.config.schema import Config
from tests.support.configs import T0, ev, quiz_config

PROBE_SOURCE = Path(__file__).resolve().parents[1] / "support" / "fsync_probe.c"
KG = 16


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe, compiled for this machine (gcc is part of the build tools every Python here needs)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "the durability tests need a C compiler (gcc) to build their fsync probe"
    out = tmp_path_factory.mktemp("probe") / "fsync_probe.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(PROBE_SOURCE), "-ldl"], check=True)
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return quiz_config(tmp_path_factory.mktemp("cfg"), key_groups=KG)


def fsyncs(log: Path) -> list[tuple[float, float]]:
    if not log.exists():
        return []
    return [(float(a), float(b)) for _, a, b in (line.split() for line in log.read_text().splitlines())]


def commit_windows(server: RedisServer, config: Config, n: int) -> list[tuple[float, float]]:
    """Commit `n` batches one after the other; (sent, answered) times of each commit."""
    client = server.client()
    store = RedisStore(client, KG)
    epochs = store.claim(range(KG))
    engine = ShardEngine(config)
    windows = []
    for i in range(n):
        out = engine.process([ev(f"d{i}", f"u{i}")], T0)
        snaps = engine.snapshot()
        time.sleep(0.05)
        sent = time.time()
        store.commit(epochs, snaps, out.journal, out.actions, out.failed, {"lottery": "playbus:actions:lottery"})
        windows.append((sent, time.time()))
    client.close()
    return windows


def fsynced_inside(window: tuple[float, float], calls: list[tuple[float, float]]) -> bool:
    sent, answered = window
    return any(sent <= start and end <= answered for start, end in calls)


def test_with_appendfsync_always_every_commit_is_fsynced_before_its_reply(probe: Path, config: Config,
                                                                         tmp_path: Path) -> None:
    log = tmp_path / "fsync.log"
    with RedisServer(tmp_path / "redis", appendfsync="always",
                     env={"LD_PRELOAD": str(probe), "FSYNC_LOG": str(log)}) as server:
        windows = commit_windows(server, config, 6)
    calls = fsyncs(log)
    assert calls, "the probe saw no fsync at all"
    assert all(fsynced_inside(w, calls) for w in windows)


def test_with_appendfsync_everysec_a_commit_is_answered_before_its_fsync_which_follows_within_seconds(
        probe: Path, config: Config, tmp_path: Path) -> None:
    log = tmp_path / "fsync.log"
    with RedisServer(tmp_path / "redis", appendfsync="everysec",
                     env={"LD_PRELOAD": str(probe), "FSYNC_LOG": str(log)}) as server:
        windows = commit_windows(server, config, 6)
        deadline = time.monotonic() + 5.0  # "everysec": about a second, later on a loaded machine
        while True:
            time.sleep(0.2)
            calls = fsyncs(log)
            if any(start >= windows[-1][1] for start, _ in calls) or time.monotonic() > deadline:
                break
    assert sum(fsynced_inside(w, calls) for w in windows) <= 1  # the background fsync may fall in one, by chance
    assert any(start >= windows[-1][1] for start, _ in calls), "no fsync in the five seconds after the commits"
