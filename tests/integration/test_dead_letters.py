"""Dead letters against a real Redis: listing, redrive with the original action ids (exactly once, even when
redriven twice or concurrently), the admin endpoints with their audit entries, the `playbus dead` command over
HTTP, and a redriven action delivered again by a Deliverer with the same id."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from playbus.actors.service.admin_dead import DeadLetterAdmin
from playbus.actors.service.delivery import Deliverer
from playbus.actors.store.audit import AuditLog
from playbus.actors.store.deadletters import DeadLetters
from playbus.actors.store.outbox import Outbox, Settlement
from playbus.admin_dead import add_dead_parser, run_dead_command
from playbus.config.schema import TargetConfig
from playbus.errors import CliError
from tests.integration.test_delivery import Receiver, action, settled, until

DEAD = "playbus:dead"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def outbox(r: Any, kg: int) -> list[bytes]:
    """The action bytes in a group's outbox, oldest first."""
    return [f[b"action"] for _, f in r.xrange(f"playbus:{{kg{kg}}}:outbox")]


def raw(a: dict[str, Any]) -> bytes:
    return json.dumps(a).encode()


def dead_letter(r: Any, kg: int, a: dict[str, Any] | bytes, error: str = "HTTP 400: no", attempts: int = 1) -> None:
    """Dead-letter an action the way a deliverer does: into the group's outbox, read by a consumer of the
    delivery group, settled as dead (Outbox.settle)."""
    box = Outbox(r, [kg], "test-deliverer")
    box.ensure_groups()
    r.xadd(f"playbus:{{kg{kg}}}:outbox", {"action": a if isinstance(a, bytes) else raw(a)})
    [found] = box.read_new(10, None)
    aid = json.loads(found.raw)["id"] if isinstance(a, dict) else found.entry
    box.settle(Settlement(dead=[(kg, found.entry, aid, found.raw, error, attempts)]))
    assert not outbox(r, kg)
    time.sleep(0.002)  # distinct entry-id milliseconds: "newest first" is then unambiguous


def ids_of(rows: list[dict[str, Any]]) -> list[str]:
    return [d["action"]["id"] for d in rows]


@pytest.fixture
def seeded(clean_redis: Any) -> Any:
    """w1..w4 (wallet, groups 0/1/2/0), l1 (lottery, group 1), then an entry that is not an action."""
    r = clean_redis
    for i, aid in enumerate(["w1", "w2", "w3", "w4"]):
        dead_letter(r, [0, 1, 2, 0][i], action(aid), f"HTTP 503: down {i}", attempts=5)
    dead_letter(r, 1, action("l1", "lottery.grant_chance"), "no target configured for gameplay 'lottery'")
    dead_letter(r, 2, b"not json")
    return r


def test_dead_letters_are_listed_newest_first_by_target_with_their_original_actions(seeded: Any) -> None:
    r = seeded
    dead = DeadLetters(r)
    rows = dead.list(None, 50)
    assert [d["action"] and d["action"]["id"] for d in rows] == [None, "l1", "w4", "w3", "w2", "w1"]
    assert [d["at"] for d in rows] == sorted((d["at"] for d in rows), reverse=True)
    bad, l1, w4 = rows[0], rows[1], rows[2]
    assert bad["action"] is None and bad["raw"] == "not json" and bad["kg"] == 2
    assert l1["target"] == "lottery" and l1["error"] == "no target configured for gameplay 'lottery'"
    assert w4 == {"id": w4["id"], "action": action("w4"), "target": "wallet", "error": "HTTP 503: down 3",
                  "attempts": 5, "kg": 0, "at": int(w4["id"].split("-")[0])}
    assert abs(w4["at"] - time.time() * 1000) < 60_000
    assert ids_of(dead.list("wallet", 50)) == ["w4", "w3", "w2", "w1"]
    assert ids_of(dead.list("wallet", 2)) == ["w4", "w3"]
    assert dead.list("nowhere", 50) == [] and dead.list(None, 0) == []
    assert dead.count() == 6


def test_the_list_pages_through_a_long_dead_stream(clean_redis: Any) -> None:
    r = clean_redis
    for i in range(2500):  # more than two XREVRANGE pages; the target's letters only in the oldest page
        t = "lottery.grant" if i < 3 else "wallet.grant_cash"
        r.xadd(DEAD, {"action": raw(action(f"x{i}", t)), "error": "e", "attempts": 1, "kg": i % 4, "entry": "0-1"})
    dead = DeadLetters(r)
    assert ids_of(dead.list("lottery", 10)) == ["x2", "x1", "x0"]
    assert len(dead.list(None, 5000)) == 1000  # at most MAX_LIST
    res = dead.redrive("lottery", all=True)
    assert res == {"redriven": 3, "ids": ["x0", "x1", "x2"], "not_found": []}
    assert r.xlen(DEAD) == 2497


def test_redrive_by_action_id_queues_each_once_in_its_group_s_outbox_with_the_original_bytes(seeded: Any) -> None:
    r = seeded
    dead = DeadLetters(r)
    before = {d["id"]: (d["action"] or {}).get("id") for d in dead.list(None, 50)}
    res = dead.redrive(None, ["w2", "l1", "nope", "w2"])
    assert res == {"redriven": 2, "ids": ["w2", "l1"], "not_found": ["nope"]}  # oldest dead letter first
    assert outbox(r, 1) == [raw(action("w2")), raw(action("l1", "lottery.grant_chance"))]
    assert outbox(r, 0) == [] and outbox(r, 2) == []
    assert {d["id"] for d in dead.list(None, 50)} == {e for e, aid in before.items() if aid not in ("w2", "l1")}

    again = dead.redrive(None, ["w2", "l1"])  # a second redrive of the same ids queues nothing
    assert again == {"redriven": 0, "ids": [], "not_found": ["w2", "l1"]}
    assert len(outbox(r, 1)) == 2

    other = dead.redrive("lottery", ["w3"])  # an id of another target is not found among the lottery's
    assert other == {"redriven": 0, "ids": [], "not_found": ["w3"]}
    assert "w3" in ids_of(dead.list("wallet", 50))


def test_redrive_all_of_a_target_then_everything_redrivable(seeded: Any) -> None:
    r = seeded
    dead = DeadLetters(r)
    res = dead.redrive("wallet", all=True)
    assert res == {"redriven": 4, "ids": ["w1", "w2", "w3", "w4"], "not_found": []}
    assert outbox(r, 0) == [raw(action("w1")), raw(action("w4"))]
    assert outbox(r, 1) == [raw(action("w2"))] and outbox(r, 2) == [raw(action("w3"))]
    assert dead.list("wallet", 50) == []
    assert dead.redrive("wallet", all=True) == {"redriven": 0, "ids": [], "not_found": []}

    res = dead.redrive(None, all=True)  # the entry that is no action stays: it would only die again
    assert res["ids"] == ["l1"]
    [left] = dead.list(None, 50)
    assert left["action"] is None and dead.count() == 1
    with pytest.raises(ValueError):
        dead.redrive(None)


def test_an_action_dead_lettered_twice_is_queued_once_and_both_letters_go(clean_redis: Any) -> None:
    r = clean_redis
    dead_letter(r, 3, action("twice"), "HTTP 503: a", 5)
    dead_letter(r, 3, action("twice"), "HTTP 503: b", 5)  # a deliverer crashed between its dead letter and ack
    assert len(DeadLetters(r).list(None, 50)) == 2
    assert DeadLetters(r).redrive(None, ["twice"]) == {"redriven": 1, "ids": ["twice"], "not_found": []}
    assert outbox(r, 3) == [raw(action("twice"))] and r.xlen(DEAD) == 0


def test_concurrent_redrives_of_the_same_actions_queue_each_exactly_once(clean_redis: Any) -> None:
    r = clean_redis
    n = 300
    pipe = r.pipeline()
    for i in range(n):
        pipe.xadd(DEAD, {"action": raw(action(f"c{i}")), "error": "e", "attempts": 3, "kg": i % 8, "entry": "0-1"})
    pipe.execute()
    results: list[dict[str, Any]] = []
    start = threading.Barrier(4)

    def go(by_ids: bool) -> None:
        start.wait()
        d = DeadLetters(r)
        results.append(d.redrive("wallet", [f"c{i}" for i in range(n)]) if by_ids else d.redrive(all=True))

    threads = [threading.Thread(target=go, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(x["redriven"] for x in results) == n
    queued = [json.loads(b)["id"] for kg in range(8) for b in outbox(r, kg)]
    assert sorted(queued) == sorted(f"c{i}" for i in range(n))  # each once
    assert r.xlen(DEAD) == 0


# -- the admin endpoints ---------------------------------------------------------------------------


def call(api: DeadLetterAdmin, method: str, path: str, query: str = "", body: Any = None,
         who: str = "ops-alice") -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    status, headers, out = asyncio.run(api.handle(method, path, query, who, data))
    assert headers["content-type"] == "application/json"
    return status, json.loads(out)


def test_the_admin_endpoints_list_redrive_refuse_bad_requests_and_audit(seeded: Any) -> None:
    r = seeded
    api = DeadLetterAdmin(DeadLetters(r), AuditLog(r))
    status, body = call(api, "GET", "/v1/dead")
    assert status == 200 and len(body["dead"]) == 6
    status, body = call(api, "GET", "/v1/dead", "target=wallet&limit=3")
    assert status == 200 and ids_of(body["dead"]) == ["w4", "w3", "w2"]
    assert body["dead"][0]["action"] == action("w4") and body["dead"][0]["attempts"] == 5
    assert call(api, "GET", "/v1/dead", "limit=5000")[0] == 200
    for q in ("limit=x", "limit=-1", "limit="):
        status, body = call(api, "GET", "/v1/dead", q)
        assert status == 400 and "limit" in body["error"]

    status, body = call(api, "POST", "/v1/dead/redrive", body={"target": "wallet", "ids": ["w1", "w9"]})
    assert (status, body) == (200, {"redriven": 1, "ids": ["w1"], "not_found": ["w9"]})
    assert outbox(r, 0) == [raw(action("w1"))]
    [entry] = AuditLog(r).recent(1)
    assert entry["who"] == "ops-alice" and entry["action"] == "dead.redrive" and entry["target"] == "wallet"
    assert entry["detail"] == {"count": 1, "ids": ["w1"], "not_found": 1}

    status, body = call(api, "POST", "/v1/dead/redrive", body={"all": True}, who="ops-bob")
    assert (status, body) == (200, {"redriven": 4, "ids": ["w2", "w3", "w4", "l1"], "not_found": []})
    entry = AuditLog(r).recent(1)[0]
    assert (entry["who"], entry["target"], entry["detail"]) == (
        "ops-bob", "*", {"count": 4, "ids": ["w2", "w3", "w4", "l1"], "all": True})
    status, body = call(api, "POST", "/v1/dead/redrive", body={"ids": ["w2"]})
    assert (status, body) == (200, {"redriven": 0, "ids": [], "not_found": ["w2"]})

    bad = {
        b"not json": "JSON", b"[1]": "body must be", json.dumps({"id": ["w1"]}).encode(): "'id'",
        json.dumps({}).encode(): "ids", json.dumps({"ids": []}).encode(): "ids",
        json.dumps({"ids": "w1"}).encode(): "ids", json.dumps({"ids": [1]}).encode(): "ids",
        json.dumps({"all": "yes"}).encode(): "all", json.dumps({"all": False}).encode(): "ids",
        json.dumps({"all": True, "ids": ["w1"]}).encode(): "either",
        json.dumps({"all": True, "target": 3}).encode(): "target",
        json.dumps({"ids": ["x"] * 10_001}).encode(): "at most",
    }
    audited = len(AuditLog(r).recent(100))
    for data, word in bad.items():
        status, body = call(api, "POST", "/v1/dead/redrive", body=data)
        assert status == 400 and word in body["error"], (data[:40], body)
    assert len(AuditLog(r).recent(100)) == audited  # refused requests change nothing and are not audited
    assert call(api, "POST", "/v1/dead")[0] == 405
    assert call(api, "GET", "/v1/dead/redrive")[0] == 405
    assert call(api, "GET", "/v1/dead/other")[0] == 404


# -- the command, over HTTP ------------------------------------------------------------------------


class AdminServer:
    """DeadLetterAdmin behind a local aiohttp server that checks a bearer token, as the ingress does."""

    TOKEN = "t0ken-for-tests"

    def __init__(self, api: DeadLetterAdmin) -> None:
        self.api = api
        self._loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.SockSite(self._runner, sock).start())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.TOKEN}":
            return web.json_response({"error": "missing or wrong admin token"}, status=401)
        status, headers, body = await self.api.handle(request.method, request.path, request.query_string, "cli",
                                                      await request.read())
        return web.Response(status=status, body=body, headers=headers)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def cli(server: AdminServer, *argv: str, token: str = AdminServer.TOKEN) -> str:
    p = argparse.ArgumentParser(prog="playbus")
    add_dead_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["dead", "--url", server.url, *argv, "--token", token])
    out = io.StringIO()
    assert run_dead_command(args, out) == 0
    return out.getvalue()


def test_the_dead_command_lists_as_a_table_or_json_and_redrives(seeded: Any) -> None:
    r = seeded
    server = AdminServer(DeadLetterAdmin(DeadLetters(r), AuditLog(r)))
    try:
        table = cli(server, "list", "--target", "wallet", "--limit", "3").splitlines()
        assert table[0].split() == ["ID", "TARGET", "ATTEMPTS", "AGE", "ERROR"]
        assert [line.split()[:3] for line in table[1:]] == [["w4", "wallet", "5"], ["w3", "wallet", "5"],
                                                            ["w2", "wallet", "5"]]
        assert table[1].split()[3].endswith("s") and table[1].endswith("HTTP 503: down 3")
        assert "not an action" in cli(server, "list")
        assert json.loads(cli(server, "list", "--json"))["dead"][1]["action"] == action("l1", "lottery.grant_chance")

        text = cli(server, "redrive", "--ids", "w1", "w9")
        assert text.splitlines() == ["redriven: 1 action queued again with their original ids", "  w1",
                                     "not found (no dead letter): w9"]
        assert json.loads(cli(server, "redrive", "--all", "--target", "wallet", "--json")) == {
            "redriven": 3, "ids": ["w2", "w3", "w4"], "not_found": []}
        assert outbox(r, 0) == [raw(action("w1")), raw(action("w4"))]
        assert cli(server, "list", "--target", "wallet") == "no dead letters\n"
        with pytest.raises(CliError, match="401"):
            cli(server, "list", token="wrong-token")
    finally:
        server.close()


# -- end to end: the deliverer delivers a redriven action with its original id ----------------------


def test_a_redriven_action_is_delivered_again_with_the_same_id_and_bytes(clean_redis: Any,
                                                                        receiver: Receiver) -> None:
    r = clean_redis
    receiver.reset()
    receiver.plans["refused"] = [(0, 400), (0, 200)]  # refused once (dead-lettered at once), then accepted
    receiver.plans["down"] = [(0, 503), (0, 503), (0, 200)]  # down for its 2 attempts, then back
    r.xadd("playbus:{kg4}:outbox", {"action": raw(action("refused"))})
    r.xadd("playbus:{kg5}:outbox", {"action": raw(action("down"))})
    targets = {"wallet": TargetConfig(webhook=receiver.url, max_attempts=2)}
    d = Deliverer(r, targets, [4, 5], "d1", base_backoff_s=0.01)
    until(lambda: settled(r, [4, 5]), d.run_once)
    dead = DeadLetters(r)
    assert sorted(ids_of(dead.list("wallet", 10))) == ["down", "refused"]
    assert d.stats()["dead"] == 2 and len(receiver.of("down")) == 2

    api = DeadLetterAdmin(dead, AuditLog(r))
    assert call(api, "POST", "/v1/dead/redrive", body={"ids": ["refused", "down"]})[1]["redriven"] == 2
    until(lambda: settled(r, [4, 5]), d.run_once)

    assert d.stats()["delivered"] == 2 and dead.count() == 0
    for aid, attempts in (("refused", 2), ("down", 3)):
        calls = receiver.of(aid)
        assert len(calls) == attempts  # the redriven one got a fresh attempt count: delivered on its first try
        assert all(c.key == aid and c.body == raw(action(aid)) for c in calls)
