"""PlaybusClient against IngressCore served over real HTTP (aiohttp, in-process) with two ShardCores."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import pytest
from aiohttp import web

from playbus.actors.service.http_api import IngressCore
from playbus.actors.service.shard import ShardCore
from playbus.client import ClientClosedError, DeliveryError, PlaybusClient, RequestRejectedError, StreamProducer
from playbus.client.streams import partition_of
from playbus.config.schema import Config
from tests.support.configs import T0, quiz_config


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return quiz_config(tmp_path_factory.mktemp("cfg"))


def ev(eid: str, user: str) -> dict[str, Any]:
    return {"id": eid, "campaign": "c1", "user": user, "type": "quiz.answered", "ts": T0}


class Server:
    """IngressCore over HTTP on 127.0.0.1, in a background loop; records requests and injects faults.

    `faults` is consumed one per request: "503" (answer 503 Retry-After: 1 without processing),
    "500", "drop_before" (close the connection without processing), "drop_after" (process, then close
    the connection instead of answering).
    """

    def __init__(self, config: Config, redis_url: str) -> None:
        self.cores = [ShardCore(config, i, redis_url) for i in range(config.shards)]

        async def call(i: int, method: str, args: Any) -> Any:
            if method == "process":
                return msgpack.packb(self.cores[i].process(msgpack.unpackb(args[0], raw=False)))
            return getattr(self.cores[i], method)(*args)

        self.core = IngressCore(config, call, redis_url)
        self.faults: deque[str] = deque()
        self.log: list[dict[str, Any]] = []  # per request: ids sent, statuses answered, fault, connection
        self.loop = asyncio.new_event_loop()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self.faults.popleft() if self.faults else None
        try:
            sent = [e.get("id") for e in msgpack.unpackb(body, raw=False)]
        except Exception:  # noqa: BLE001 - not a msgpack array of events
            sent = []
        transport = request.transport
        assert transport is not None
        entry: dict[str, Any] = {"ids": sent, "fault": fault, "conn": transport.get_extra_info("peername"),
                                 "statuses": []}
        self.log.append(entry)
        if fault == "503":
            return web.json_response({"error": "overloaded"}, status=503, headers={"Retry-After": "1"})
        if fault == "500":
            return web.json_response({"error": "boom"}, status=500)
        if fault == "drop_before":
            transport.abort()
            raise asyncio.CancelledError
        status, headers, out = await self.core.handle(
            request.method, request.path, request.query_string, {k.lower(): v for k, v in request.headers.items()},
            body)
        if status == 200:
            entry["statuses"] = [r["status"] for r in json.loads(out)["results"]]
        if fault == "drop_after":
            transport.abort()
            raise asyncio.CancelledError
        return web.Response(status=status, headers=headers, body=out)

    def context(self, user: str) -> dict[str, Any]:
        _, _, body = self.core.get_context("c1", user)
        ctx: dict[str, Any] = json.loads(body)["context"]
        return ctx

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        for c in self.cores:
            c.close()


@pytest.fixture
def server(config: Config, redis_server: Any, clean_redis: Any) -> Iterator[Server]:
    s = Server(config, redis_server.url)
    yield s
    s.stop()


def test_events_sent_one_by_one_leave_in_few_requests_on_one_connection(server: Server) -> None:
    with PlaybusClient(server.url, linger_ms=50, max_batch=500) as client:
        events = [ev(f"a{i}", f"u{i % 40}") for i in range(400)]
        futures = [client.send(e) for e in events]
        results = [f.result(10) for f in futures]
    assert [r["id"] for r in results] == [e["id"] for e in events]
    assert {r["status"] for r in results} == {"applied"}
    assert len(server.log) <= 3, [len(r["ids"]) for r in server.log]
    assert len({r["conn"] for r in server.log}) == 1  # kept alive
    assert all(server.context(f"u{u}") == {"quiz.answered": 10} for u in range(40))


def test_a_full_batch_leaves_without_waiting_for_linger(server: Server) -> None:
    with PlaybusClient(server.url, linger_ms=10_000, max_batch=100) as client:
        t = time.monotonic()
        futures = [client.send(ev(f"b{i}", f"u{i % 50}")) for i in range(1000)]
        results = [f.result(10) for f in futures]
        assert time.monotonic() - t < 5
    assert [r["id"] for r in results] == [f"b{i}" for i in range(1000)]
    assert [len(r["ids"]) for r in server.log] == [100] * 10


def test_results_map_back_to_their_futures_across_threads(server: Server) -> None:
    def produce(t: int) -> list[tuple[dict[str, Any], Any]]:
        out = []
        for i in range(150):
            e = ev(f"t{t}-{i}", f"u{t}-{i % 7}")
            if i % 10 == 3:
                del e["campaign"]  # rejected, the others in the request still processed
            out.append((e, client.send(e)))
        out.append((ev(f"t{t}-0", f"u{t}-0"), client.send(ev(f"t{t}-0", f"u{t}-0"))))  # a resend
        return out

    with PlaybusClient(server.url, linger_ms=5, max_batch=200) as client, ThreadPoolExecutor(4) as pool:
        sent = [pair for part in pool.map(produce, range(4)) for pair in part]
        client.flush()
        for e, fut in sent:
            r = fut.result(0)
            assert r["id"] == e["id"]
            if "campaign" not in e:
                assert r["status"] == "rejected" and "campaign" in r["errors"][0]
        resends = [fut.result(0)["status"] for e, fut in sent if e["id"].endswith("-0")]
        assert sorted(resends) == ["applied"] * 4 + ["duplicate"] * 4
    assert sum(len(r["ids"]) for r in server.log) == 4 * 151
    assert len(server.log) < 4 * 151 / 10


def test_503_with_retry_after_is_retried_with_the_same_ids(server: Server) -> None:
    server.faults.append("503")
    with PlaybusClient(server.url, linger_ms=1000) as client:
        t = time.monotonic()
        results = client.send_many([ev(f"c{i}", f"u{i}") for i in range(50)])
        waited = time.monotonic() - t
    assert waited >= 1.0  # Retry-After: 1 honoured
    assert [r["status"] for r in results] == ["applied"] * 50
    assert [r["fault"] for r in server.log] == ["503", None]
    assert server.log[0]["ids"] == server.log[1]["ids"] == [f"c{i}" for i in range(50)]


def test_a_lost_answer_is_retried_and_answered_duplicate_never_applied_twice(server: Server) -> None:
    server.faults.append("drop_after")
    with PlaybusClient(server.url, linger_ms=1000, backoff_s=0.01) as client:
        results = client.send_many([ev(f"d{i}", f"u{i % 5}") for i in range(60)])
    assert [r["fault"] for r in server.log] == ["drop_after", None]
    assert server.log[0]["ids"] == server.log[1]["ids"]
    assert server.log[0]["statuses"] == ["applied"] * 60
    assert server.log[1]["statuses"] == ["duplicate"] * 60
    assert {r["status"] for r in results} <= {"applied", "duplicate"}
    assert [server.context(f"u{u}") for u in range(5)] == [{"quiz.answered": 12}] * 5


def test_a_dropped_connection_before_processing_is_retried(server: Server) -> None:
    server.faults.extend(["drop_before", "500"])
    with PlaybusClient(server.url, linger_ms=1000, backoff_s=0.01) as client:
        results = client.send_many([ev(f"e{i}", f"u{i}") for i in range(20)])
        assert client.retries == 2
    assert [r["status"] for r in results] == ["applied"] * 20
    assert [r["fault"] for r in server.log] == ["drop_before", "500", None]
    assert server.log[0]["ids"] == server.log[1]["ids"] == server.log[2]["ids"]


def test_persistent_5xx_ends_in_delivery_error_after_max_retries(server: Server) -> None:
    server.faults.extend(["500"] * 3)
    with PlaybusClient(server.url, linger_ms=1, max_retries=2, backoff_s=0.01) as client:
        fut = client.send(ev("f1", "u1"))
        with pytest.raises(DeliveryError, match="3 attempts.*500: boom"):
            fut.result(10)
        assert client.send(ev("f2", "u1")).result(10)["status"] == "applied"  # the client goes on
    assert len(server.log) == 4


def test_413_fails_only_the_oversized_event(server: Server) -> None:
    huge = ev("g-huge", "u1") | {"data": {"blob": "x" * (21 * 1024 * 1024)}}
    with PlaybusClient(server.url, linger_ms=5000) as client:
        futures = [client.send(e) for e in (ev("g1", "u1"), huge, ev("g2", "u2"), ev("g3", "u3"))]
        client.flush()
    with pytest.raises(RequestRejectedError, match="413.*exceeds") as info:
        futures[1].result(0)
    assert info.value.status == 413
    assert [futures[i].result(0)["status"] for i in (0, 2, 3)] == ["applied"] * 3
    assert [len(r["ids"]) for r in server.log] == [4, 2, 1, 1, 2]  # split until the culprit stands alone


def test_400_resolves_futures_with_the_reason(server: Server) -> None:
    with PlaybusClient(server.url, linger_ms=1000, headers={"Content-Type": "application/json"}) as client:
        futures = [client.send(ev(f"h{i}", "u1")) for i in range(3)]
        client.flush()
    for f in futures:
        with pytest.raises(RequestRejectedError, match="400.*not valid JSON"):
            f.result(0)
    assert [len(r["ids"]) for r in server.log] == [3, 1, 2, 1, 1]  # split until each fails alone


def test_close_sends_what_is_still_lingering(server: Server) -> None:
    client = PlaybusClient(server.url, linger_ms=60_000)
    futures = [client.send(ev(f"i{i}", "u1")) for i in range(5)]
    client.close(10)
    assert [f.result(0)["status"] for f in futures] == ["applied"] * 5
    with pytest.raises(ClientClosedError):
        client.send(ev("i9", "u1"))
    assert server.context("u1") == {"quiz.answered": 5}


def test_stream_producer_writes_record_batches_into_the_partitions_it_learns_from_redis(clean_redis: Any) -> None:
    with pytest.raises(RuntimeError, match="has not recorded its key_groups"):
        StreamProducer(clean_redis).send_many([ev("j0", "u1")])
    clean_redis.hset("playbus:{meta}:layout", "key_groups", 16)  # what playbus records at its first start
    events = [ev(f"j{i}", f"u{i % 7}") for i in range(700)]
    before = clean_redis.info("commandstats").get("cmdstat_xadd", {}).get("calls", 0)
    ids = StreamProducer(clean_redis, batch=300).send_many(events)
    assert len(ids) == 700 and all(ids)
    xadds = clean_redis.info("commandstats")["cmdstat_xadd"]["calls"] - before
    assert xadds <= 7 * 2  # one record batch per partition and 300 events, not one entry per event
    for u in range(7):
        kg = partition_of("c1", f"u{u}", 16)
        got = [e["id"] for _, f in clean_redis.xrange(f"playbus:{{kg{kg}}}:in") for e in msgpack.unpackb(f[b"events"])
               if e["user"] == f"u{u}"]
        assert got == [f"j{i}" for i in range(700) if i % 7 == u]  # each user's events in the order sent


def test_a_stream_producer_given_other_key_groups_than_playbus_recorded_refuses_to_write(clean_redis: Any) -> None:
    StreamProducer(clean_redis, key_groups=16).send_many([ev("k0", "u1")])  # before playbus ran: taken as given
    clean_redis.hset("playbus:{meta}:layout", "key_groups", 16)
    assert StreamProducer(clean_redis, key_groups=16).send_many([ev("k1", "u1")])[0]
    with pytest.raises(ValueError, match="key_groups=8 given, but playbus uses 16"):
        StreamProducer(clean_redis, key_groups=8).send_many([ev("k2", "u1")])
    assert sum(clean_redis.xlen(f"playbus:{{kg{kg}}}:in") for kg in range(16)) == 2  # nothing of k2 written
