"""Backtests against a real Redis (no Ray): batches committed through ShardCore record their events in the
journal, and `POST /v1/scripts/{name}/backtest` (BacktestAdmin) replays the last N of them through the active
version and a candidate, from the users' states rewound to before those events, and writes nothing: the
dataset's DEBUG DIGEST is the same before and after."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.engine.budgets import BudgetShortage
from playbus.actors.engine.keys import group_prefix
from playbus.actors.service.admin_backtest import BacktestAdmin
from playbus.actors.service.shard import ShardCore
from playbus.actors.store.campaigns import CampaignState
from playbus.actors.store.catalog import ScriptCatalog
from playbus.actors.store.recorded import ran_rules, read_recorded, recorded_events
from playbus.actors.store.server import RedisServer
from playbus.config.loader import with_campaigns
from playbus.config.schema import Config
from tests.support.configs import make_config
from tests.unit.test_backtest import V1, V2

# The active version grants a chance on every second answer; the candidate on every answer. Cap: 3 a day.
USERS = [f"u{i}" for i in range(10)]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This module's own redis-server, with DEBUG allowed (DEBUG DIGEST proves a backtest wrote nothing)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), extra_args=["--enable-debug-command", "local"])
    server.start()
    yield server
    server.stop()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, {"quiz": V1},
                       [{"id": "quiz", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]}],
                       campaign="c1", starts="2026-01-01T00:00:00+08:00", ends="2028-01-01T00:00:00+08:00",
                       caps=[{"id": "daily", "action": "lottery.grant_chance", "per_user": 3, "period": "day"}],
                       budgets=[{"name": "chances", "action": "lottery.grant_chance", "param": "chances",
                                 "total": 10_000_000}],
                       shards=1, key_groups=4)


def recording(core: ShardCore) -> list[list[Any]]:
    """Make the core's commits record their events, as the shard does once it passes `recorded` (kept as it
    is when the shard passes it already); the list to put each batch's events in before processing it."""
    current: list[list[Any]] = [[]]
    commit = core.store.commit

    def record(*args: Any, **kw: Any) -> list[int]:
        if "recorded" not in kw:
            kw["recorded"] = ran_rules(current[0], args[2] if len(args) > 2 else kw["journal"])
        return commit(*args, **kw)

    core.store.commit = record  # type: ignore[method-assign]
    return current


def process(core: ShardCore, current: list[list[Any]], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As the batcher does: a batch whose budget leases were short is decided again once they are refilled."""
    current[0] = events
    for _ in range(5):
        try:
            return core.process(events)
        except BudgetShortage as e:
            core.forget(core.keys_of(events))
            assert core.recover(e)
    raise AssertionError("the batch kept overdrawing its leases")


def answer(user: str, n: int, ts: int) -> dict[str, Any]:
    return {"id": f"{user}-{n}", "campaign": "c1", "user": user, "type": "quiz.answered", "ts": ts}


def digest(client: Any) -> bytes:
    return bytes(client.execute_command("DEBUG", "DIGEST"))


def admin_of(config: Config, client: Any) -> BacktestAdmin:
    catalog = ScriptCatalog(client)
    return BacktestAdmin(config, client, catalog,
                         lambda: with_campaigns(config, CampaignState(client).configs(), catalog.active_sources()))


def call(admin: BacktestAdmin, body: Any, name: str = "quiz") -> tuple[int, dict[str, Any]]:
    status, _, raw = asyncio.run(admin.backtest(name, json.dumps(body).encode() if not isinstance(body, bytes)
                                                else body, "tester"))
    return status, json.loads(raw)


def grants_of(results: list[dict[str, Any]]) -> int:
    return sum(len(r["actions"]) for r in results)


def test_a_backtest_of_recorded_events_starts_from_the_states_before_them_and_writes_nothing(
        clean_redis: Any, config: Config, redis_server: RedisServer) -> None:
    core = ShardCore(config, 0, redis_server.url)
    current = recording(core)
    t0 = int(time.time() * 1000) - 60_000
    rounds = []
    for n in range(1, 7):  # six rounds, one answer of every user each, one batch a round
        rounds.append(process(core, current, [answer(u, n, t0 + 1000 * n + i) for i, u in enumerate(USERS)]))
        time.sleep(0.002)  # journal entry ids order groups' entries by the millisecond: keep rounds apart
    core.close()  # gives its budget leases back: from here on, nothing writes
    assert [grants_of(r) for r in rounds] == [0, 10, 0, 10, 0, 10]  # n = 2, 4, 6
    assert ScriptCatalog(clean_redis).add("quiz", V2) == 2

    # The journal holds every event whose rules ran, in time order; the last N are the newest committed.
    events = recorded_events(clean_redis, 4, "c1", 1000)
    assert [e.id for e in events] == [f"{u}-{n}" for n in range(1, 7) for u in USERS]
    last15 = recorded_events(clean_redis, 4, "c1", 15)  # round 6, and 5 of round 5 (the groups committed last)
    assert [e.id for e in last15[5:]] == [f"{u}-6" for u in USERS]
    assert {e.id.split("-")[1] for e in last15[:5]} == {"5"} and [e.ts for e in last15] == sorted(e.ts for e in last15)
    assert recorded_events(clean_redis, 4, "other", 10) == []
    rec = read_recorded(clean_redis, 4, "c1", 30)
    assert rec.written == {f"c1\x00{u}": {"n"} for u in USERS}
    assert rec.before == {f"c1\x00{u}": {"n": 3} for u in USERS} and rec.assumed == 0 and rec.complete

    admin = admin_of(config, clean_redis)
    before = digest(clean_redis)
    # The whole history: the users start empty (the journal shows "n" first written in the window), and the
    # active version decides exactly what was decided.
    status, doc = call(admin, {"candidate": {"version": 2}, "recorded": {"last": 60}})
    assert status == 200, doc
    assert doc["events"] == 60 and doc["users"] == 10
    assert doc["grants"]["active"] == {"lottery.grant_chance": 30}
    # per user, n = 1..6: V1 grants at 2, 4, 6; V2 at 1, 2, 3 and is capped from 4 on
    assert doc["changed"] == 40
    assert doc["grants"]["added"] == {"lottery.grant_chance": 20}
    assert doc["grants"]["removed"] == {"lottery.grant_chance": 20}
    assert doc["budgets"] == {"chances": 0} and doc["caps"]["users"] == 10
    assert doc["starting_states"] == {"users": 10, "committed": 10, "unreadable": 0, "rewound": 10,
                                      "assumed_absent": 0, "complete": True}
    assert doc["recorded"]["found"] == 60 and doc["recorded"]["campaigns"] == ["c1"]

    # The last three rounds: "n" rewound to 3 and the cap counters to one chance today, so the active version
    # again decides what was decided (n = 4 and 6 granted); the candidate grants at 4 and 5 and is capped at 6.
    status, doc = call(admin, {"candidate": {"version": 2}, "recorded": {"last": 30}})
    assert status == 200, doc
    assert doc["grants"]["active"] == {"lottery.grant_chance": grants_of(rounds[3] + rounds[4] + rounds[5])}
    assert doc["changed"] == 20 and doc["caps"]["users"] == 10
    assert doc["grants"]["added"] == doc["grants"]["removed"] == {"lottery.grant_chance": 10}
    example = doc["examples"][0]
    assert example["event"]["id"] == "u0-5" and example["active"] == []
    assert [a["params"] for a in example["candidate"]] == [{"chances": 1}]

    # The same version as the candidate: nothing changes.
    status, doc = call(admin, {"candidate": {"version": 1}, "recorded": {"last": 60}})
    assert status == 200 and doc["changed"] == 0

    # Given events start from the states as they are now: u0 has n = 6 and 3 chances today (capped in both),
    # a new user "z" gains a chance at its first answer under the candidate.
    now = int(time.time() * 1000)
    given = [answer("u0", 7, now), answer("z", 1, now), answer("z", 2, now + 1)]
    status, doc = call(admin, {"candidate": {"source": V2}, "events": given})
    assert status == 200, doc
    assert doc["events"] == 3 and doc["changed"] == 1 and doc["candidate"] == {"version": 0}
    assert doc["refusals"] == {"cap:daily": {"active": 0, "candidate": 1}}
    assert doc["starting_states"]["committed"] == 1 and "recorded" not in doc

    # Refusals, each with a clear message.
    for body, want in [
        (b"{", 400), ({"candidate": {"version": 2}}, 400), ({"recorded": {"last": 5}}, 400),
        ({"candidate": {"version": 2, "source": V2}, "recorded": {"last": 5}}, 400),
        ({"candidate": {"version": 2}, "recorded": {"last": 5}, "events": []}, 400),
        ({"candidate": {"version": 9}, "recorded": {"last": 5}}, 422),
        ({"candidate": {"version": 2}, "recorded": {"last": 0}}, 422),
        ({"candidate": {"version": 2}, "recorded": {"last": 100_001}}, 413),
        ({"candidate": {"version": 2}, "recorded": {"last": 5, "campaign": "nope"}}, 422),
        ({"candidate": {"version": 2}, "events": given * 334}, 413),
        ({"candidate": {"source": "function decide(e, ctx"}, "recorded": {"last": 5}}, 422),
    ]:
        status, doc = call(admin, body)
        assert status == want, (body, status, doc)
        assert doc["error"]
    assert call(admin, {"candidate": {"version": 2}, "recorded": {"last": 5}}, name="nope")[0] == 404
    # No side effect anywhere: the dataset is byte for byte the same, the audit log included.
    assert digest(clean_redis) == before


def test_recording_is_backward_compatible_and_costs_a_field_of_the_journal_entry(
        clean_redis: Any, config: Config, redis_server: RedisServer) -> None:
    core = ShardCore(config, 0, redis_server.url)
    t0 = int(time.time() * 1000) - 60_000
    commit = core.store.commit

    def unrecorded(*args: Any, **kw: Any) -> list[int]:  # as commits were before events were recorded
        return commit(*args, **{**kw, "recorded": ()})

    core.store.commit = unrecorded  # type: ignore[method-assign]
    process(core, [[]], [answer(u, 1, t0 + i) for i, u in enumerate(USERS)])  # entries without "e"
    core.store.commit = commit  # type: ignore[method-assign]
    current = recording(core)
    process(core, current, [answer(u, 2, t0 + 100 + i) for i, u in enumerate(USERS)])
    core.close()
    entries = [f for kg in range(4) for _, f in clean_redis.xrange(group_prefix(kg) + "journal")]
    assert sum(b"e" in f for f in entries) == sum(b"e" not in f for f in entries) > 0
    assert [e.id for e in recorded_events(clean_redis, 4, "c1", 100)] == [f"{u}-2" for u in USERS]
    d = sum(len(f[b"d"]) for f in entries if b"e" in f)
    e = sum(len(f[b"e"]) for f in entries if b"e" in f)
    print(f"\njournal: decisions {d} bytes, recorded events {e} bytes (+{100 * e / d:.0f}%)")


@pytest.mark.slow
def test_a_backtest_of_100000_recorded_events(clean_redis: Any, config: Config, redis_server: RedisServer) -> None:
    """The speed of a backtest of 100,000 recorded events (printed, not asserted), and its correctness."""
    core = ShardCore(config, 0, redis_server.url)
    current = recording(core)
    users = [f"p{i}" for i in range(20_000)]
    t0 = int(time.time() * 1000) - 3_600_000
    started = time.perf_counter()
    granted = 0
    for n in range(1, 6):
        events = [answer(u, n, t0 + 20_000 * n + i // 10) for i, u in enumerate(users)]
        for i in range(0, len(events), 500):
            granted += grants_of(process(core, current, events[i:i + 500]))
    core.close()
    committed = time.perf_counter() - started
    assert ScriptCatalog(clean_redis).add("quiz", V2) == 2
    admin = admin_of(config, clean_redis)
    before = digest(clean_redis)
    started = time.perf_counter()
    status, doc = call(admin, {"candidate": {"version": 2}, "recorded": {"last": 100_000}})
    took = time.perf_counter() - started
    assert status == 200, doc
    assert digest(clean_redis) == before
    assert doc["events"] == 100_000 and doc["users"] == 20_000
    assert doc["grants"]["active"] == {"lottery.grant_chance": granted} == {"lottery.grant_chance": 40_000}
    assert doc["grants"]["candidate"] == {"lottery.grant_chance": 60_000}  # n = 1, 2, 3; capped at 4, 5
    assert doc["changed"] == 20_000 * 3 and doc["caps"]["users"] == 20_000  # n = 1, 3 added, 4 removed
    print(f"\nbacktest of 100,000 recorded events: {took:.1f} s in all ({100_000 / took:,.0f} events/s), of which "
          f"the two runs {doc['decide_seconds']:.1f} s ({100_000 / doc['decide_seconds']:,.0f} events/s), "
          f"{doc['recorded']['journal_entries']} journal entries read; committing them took {committed:.1f} s")


class BacktestServer:
    """BacktestAdmin behind a local aiohttp server at /v1/scripts/{name}/backtest, as the ingress routes it."""

    TOKEN = "t0ken-for-tests"

    def __init__(self, api: BacktestAdmin) -> None:
        import socket
        import threading

        from aiohttp import web

        self.api = api
        self._loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

        async def handle(request: web.Request) -> web.Response:
            if request.headers.get("Authorization") != f"Bearer {self.TOKEN}":
                return web.json_response({"error": "missing or wrong admin token"}, status=401)
            status, headers, body = await self.api.backtest(request.match_info["name"], await request.read(), "cli")
            return web.Response(status=status, body=body, headers=headers)

        app = web.Application()
        app.router.add_post("/v1/scripts/{name}/backtest", handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.SockSite(self._runner, sock).start())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def test_the_cli_backtests_over_http_with_progress_and_a_summary(
        clean_redis: Any, config: Config, redis_server: RedisServer, tmp_path: Path) -> None:
    import argparse
    import io

    from playbus.admin_backtest import add_backtest_args, run_backtest
    from playbus.errors import CliError

    core = ShardCore(config, 0, redis_server.url)
    current = recording(core)
    t0 = int(time.time() * 1000) - 60_000
    for n in range(1, 5):
        process(core, current, [answer(u, n, t0 + 1000 * n + i) for i, u in enumerate(USERS)])
        time.sleep(0.002)
    core.close()
    (tmp_path / "v2.lua").write_text(V2)
    server = BacktestServer(admin_of(config, clean_redis))
    try:
        p = argparse.ArgumentParser(prog="playbus")
        p.add_argument("--url")
        p.add_argument("--token")
        add_backtest_args(p.add_subparsers(dest="op", required=True))

        def cli(*argv: str) -> tuple[str, str]:
            out, err = io.StringIO(), io.StringIO()
            args = p.parse_args(["--url", server.url, "--token", BacktestServer.TOKEN, *argv])
            assert run_backtest(args, out, err) == 0
            return out.getvalue(), err.getvalue()

        out, err = cli("backtest", "quiz", "--source", str(tmp_path / "v2.lua"), "--last", "40")
        assert err.startswith(f"backtesting script quiz: the active version against the candidate "
                              f"{tmp_path / 'v2.lua'}, on the last 40 recorded events ...\n")
        assert "done in " in err and "40 events" in err
        # per user, n = 1..4: V1 grants at 2, 4; V2 at 1, 2, 3 and is capped at 4
        assert "changed:   30 events (75.0%)" in out
        assert "grants added:   lottery.grant_chance +20" in out
        assert "grants removed: lottery.grant_chance -10" in out
        assert "chances +10 (active 20, candidate 30)" in out
        assert "caps:      10 users would hit a cap" in out
        out, _ = cli("backtest", "quiz", "--source", str(tmp_path / "v2.lua"), "--last", "40", "--json")
        assert json.loads(out)["changed"] == 30
        with pytest.raises(CliError, match="HTTP 422"):
            cli("backtest", "quiz", "--version", "7", "--last", "40")
    finally:
        server.close()
