"""StreamIngress against a real Redis with two in-process ShardCores: exactly once, rejects, acks, recovery."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from playbus.actors.engine.keys import user_key
from playbus.actors.engine.state import decode_snapshot
from playbus.actors.service.router import Router
from playbus.actors.service.shard import ShardCore
from playbus.actors.service.stream_ingress import GROUP, IN_STREAM, REJECTED_STREAM, StreamIngress
from playbus.actors.store.commit import RedisStore
from playbus.client import StreamProducer
from playbus.config.schema import Config
from tests.support.configs import T0, quiz_config

LOTTERY = "playbus:actions:lottery"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return quiz_config(tmp_path_factory.mktemp("cfg"))


def ev(eid: str, user: str) -> dict[str, Any]:
    return {"id": eid, "campaign": "c1", "user": user, "type": "quiz.answered", "ts": T0}


class Shards:
    """Two ShardCores in-process and the `call_shard` that StreamIngress uses to reach them."""

    def __init__(self, config: Config, redis_url: str) -> None:
        self.config = config
        self.cores = [ShardCore(config, i, redis_url) for i in range(config.shards)]
        self.router = Router(config.shards, config.key_groups)
        self.calls: list[int] = []  # events per shard call

    async def call(self, i: int, method: str, args: Any) -> Any:
        events = msgpack.unpackb(args[0], raw=False)
        self.calls.append(len(events))
        return msgpack.packb(self.cores[i].process(events))

    def reader(self, redis_url: str, **kw: Any) -> StreamIngress:
        return StreamIngress(redis_url, self.router, self.call, **kw)


@pytest.fixture
def shards(config: Config, redis_server: Any, clean_redis: Any) -> Iterator[Shards]:
    s = Shards(config, redis_server.url)
    yield s
    for c in s.cores:
        c.close()


def drain(reader: StreamIngress, client: Any, expect: int, timeout: float = 20.0) -> dict[str, int]:
    """Run the reader until it has handled `expect` entries and nothing is left pending, or time runs out."""

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(reader.run(stop))
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end and not task.done():
            s = reader.stats()
            handled = s["applied"] + s["duplicates"] + s["rejected"]
            if handled >= expect and client.xpending(IN_STREAM, GROUP)["pending"] == 0:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 5)
        await reader.client.aclose()

    asyncio.run(main())
    return reader.stats()


def context(client: Any, config: Config, user: str) -> dict[str, Any]:
    blob = RedisStore(client, config.key_groups).snapshot_of(user_key("c1", user))
    if blob is None:
        return {}
    _, raw = decode_snapshot(blob)
    return msgpack.unpackb(raw, raw=False) if raw else {}


def rejected(client: Any) -> dict[bytes, str]:
    """{input entry id: reason} of playbus:rejected."""
    return {f[b"entry"]: f[b"reason"].decode() for _, f in client.xrange(REJECTED_STREAM)}


def test_valid_events_are_applied_exactly_once_and_invalid_ones_rejected_with_a_reason(
        shards: Shards, clean_redis: Any, redis_server: Any, config: Config) -> None:
    r = clean_redis
    users = [f"u{i}" for i in range(50)]
    pipe = r.pipeline(transaction=False)
    for i in range(1000):  # half JSON (some with leading whitespace), half msgpack; 20 events per user
        e = ev(f"v{i}", users[i % 50])
        raw = msgpack.packb(e) if i % 2 == 0 else ("\n " if i % 4 == 1 else "") + json.dumps(e)
        pipe.xadd(IN_STREAM, {"event": raw})
    pipe.execute()
    bad = {
        "bad json": {"event": b'{"id": "x1", "campaign": '},
        "bad msgpack": {"event": b"\x85\xa2id\xa2x2\xc1"},
        "missing field": {"event": json.dumps({"id": "x3", "campaign": "c1", "type": "quiz.answered"})},
        "wrong types": {"event": msgpack.packb({"id": "x4", "campaign": "c1", "user": 7, "type": "quiz.answered"})},
        "wrong ts": {"event": json.dumps(ev("x5", "u1") | {"ts": "yesterday"})},
        "not an object": {"event": json.dumps([1, 2])},
        "no event field": {"payload": json.dumps(ev("x6", "u1"))},
        "unknown campaign": {"event": json.dumps(ev("x7", "u1") | {"campaign": "nope"})},
    }
    bad_ids = {name: r.xadd(IN_STREAM, fields) for name, fields in bad.items()}
    # The same event again, later: a producer's resend.
    r.xadd(IN_STREAM, {"event": json.dumps(ev("v0", "u0"))})

    stats = drain(shards.reader(redis_server.url), r, 1000 + len(bad) + 1)

    assert stats["applied"] == 1000
    assert stats["duplicates"] == 1
    assert stats["rejected"] == len(bad)
    assert all(context(r, config, u) == {"quiz.answered": 20} for u in users)
    assert r.xlen(LOTTERY) == 50  # one first-answer action per user, exactly once
    reasons = rejected(r)
    assert set(reasons) == set(bad_ids.values())
    expected = {"bad json": "neither JSON nor msgpack", "bad msgpack": "neither JSON nor msgpack",
                "missing field": "user:", "wrong types": "user:", "wrong ts": "ts:",
                "not an object": "must be an object", "no event field": 'no field "event"',
                "unknown campaign": "unknown campaign"}
    for name, eid in bad_ids.items():
        assert expected[name] in reasons[eid], (name, reasons[eid])
    assert r.xpending(IN_STREAM, GROUP)["pending"] == 0
    assert r.xlen(IN_STREAM) == 0  # acked and deleted


def test_entries_are_read_in_batches_of_at_least_500(shards: Shards, clean_redis: Any, redis_server: Any) -> None:
    StreamProducer(clean_redis).send_many([ev(f"w{i}", f"u{i % 100}") for i in range(3000)])
    reader = shards.reader(redis_server.url)
    assert reader.count >= 500
    stats = drain(reader, clean_redis, 3000)
    assert stats["applied"] == 3000
    assert stats["batches"] <= 6
    assert max(shards.calls) >= 500 / 2  # a batch goes to the shards as one call each


def _dead_reader(r: Any, shards: Shards, consumer: str, applied: int) -> list[bytes]:
    """A reader that read every entry under `consumer`, had the shards commit the first `applied` events,
    then died before acking anything. Returns the entry ids left pending."""
    try:
        r.xgroup_create(IN_STREAM, GROUP, id="0", mkstream=True)
    except Exception as e:  # noqa: BLE001 - BUSYGROUP
        assert "BUSYGROUP" in str(e)
    resp = r.xreadgroup(GROUP, consumer, {IN_STREAM: ">"}, count=100_000)
    entries = resp[0][1]
    events = [msgpack.unpackb(f[b"event"], raw=False) for _, f in entries[:applied]]
    for s, (_, evs) in shards.router.split(events).items():
        shards.cores[s].process(evs)
    return [eid for eid, _ in entries]


def test_a_restarted_reader_rereads_its_own_pending_entries_without_applying_twice(
        shards: Shards, clean_redis: Any, redis_server: Any, config: Config) -> None:
    r = clean_redis
    StreamProducer(r).send_many([ev(f"p{i}", f"u{i % 40}") for i in range(1200)])
    pending = _dead_reader(r, shards, "reader-0", applied=700)
    assert r.xpending(IN_STREAM, GROUP)["pending"] == 1200
    r.xadd(IN_STREAM, {"event": msgpack.packb(ev("p-new", "u0"))})  # arrives after the crash

    stats = drain(shards.reader(redis_server.url, consumer="reader-0", count=500), r, 1201)

    assert stats == {"applied": 501, "duplicates": 700, "rejected": 0, "batches": stats["batches"], "poison": 0}
    assert r.xpending(IN_STREAM, GROUP)["pending"] == 0
    assert r.xlen(IN_STREAM) == 0
    assert context(r, config, "u0") == {"quiz.answered": 31}
    assert all(context(r, config, f"u{u}") == {"quiz.answered": 30} for u in range(1, 40))
    assert len(pending) == 1200


def test_another_reader_claims_the_entries_of_a_dead_one(
        shards: Shards, clean_redis: Any, redis_server: Any, config: Config) -> None:
    r = clean_redis
    StreamProducer(r).send_many([ev(f"q{i}", f"u{i % 40}") for i in range(1200)])
    _dead_reader(r, shards, "reader-0", applied=300)

    reader = shards.reader(redis_server.url, consumer="reader-1", count=500, claim_idle_ms=0)
    stats = drain(reader, r, 1200)

    assert stats == {"applied": 900, "duplicates": 300, "rejected": 0, "batches": stats["batches"], "poison": 0}
    assert r.xpending(IN_STREAM, GROUP)["pending"] == 0
    assert r.xlen(IN_STREAM) == 0
    assert all(context(r, config, f"u{u}") == {"quiz.answered": 30} for u in range(40))
    assert r.xlen(LOTTERY) == 40


def test_a_batch_whose_shard_call_fails_is_read_again_without_a_restart(
        shards: Shards, clean_redis: Any, redis_server: Any, config: Config) -> None:
    r = clean_redis
    StreamProducer(r).send_many([ev(f"r{i}", f"u{i % 40}") for i in range(800)])
    failures = [ConnectionError("shard restarting")]

    async def flaky(i: int, method: str, args: Any) -> Any:
        if failures:
            raise failures.pop()
        return await shards.call(i, method, args)

    reader = StreamIngress(redis_server.url, shards.router, flaky, count=500)
    stats = drain(reader, r, 800)

    # The other shard's part of the failed batch was committed: read again, it is a duplicate.
    assert stats["applied"] + stats["duplicates"] == 800 and stats["rejected"] == 0
    assert r.xpending(IN_STREAM, GROUP)["pending"] == 0
    assert all(context(r, config, f"u{u}") == {"quiz.answered": 20} for u in range(40))



def test_an_event_with_an_integer_beyond_64_bits_is_rejected_alone(
    shards: Shards, clean_redis: Any, redis_server: Any
) -> None:
    """One unencodable entry must not block the stream: it is rejected, its neighbours are applied."""
    big = b'{"id":"big","campaign":"c1","user":"u1","type":"quiz.answered","data":{"x":1180591620717411303424}}'
    bad_id = clean_redis.xadd(IN_STREAM, {"event": big})
    clean_redis.xadd(IN_STREAM, {"event": json.dumps(ev("ok", "u2"))})
    stats = drain(shards.reader(redis_server.url), clean_redis, expect=2)
    assert stats["applied"] == 1 and stats["rejected"] == 1
    assert "cannot be encoded" in rejected(clean_redis)[bad_id]
    assert context(clean_redis, shards.config, "u2") == {"quiz.answered": 1}
    assert clean_redis.xlen(IN_STREAM) == 0


def test_a_poison_entry_is_rejected_after_three_failures_and_the_entries_behind_it_go_on(
        shards: Shards, redis_server: Any, clean_redis: Any) -> None:
    real = shards.call

    async def call(i: int, method: str, args: Any) -> Any:
        events = msgpack.unpackb(args[0], raw=False)
        if any(e.get("id") == "poison" for e in events):
            raise ValueError("the engine chokes on this event")  # a bug, not an outage
        return await real(i, method, args)

    StreamProducer(clean_redis).send_many([ev(f"ok{i}", f"u{i}") for i in range(20)] + [ev("poison", "u3")]
                                          + [ev(f"after{i}", f"u{i}") for i in range(20)])
    reader = StreamIngress(redis_server.url, shards.router, call)
    stats = drain(reader, clean_redis, expect=41, timeout=30)
    # Events of the other shard in the failed batches committed the first time: later answered `duplicate`.
    assert stats["applied"] + stats["duplicates"] == 40 and stats["poison"] == 1, stats
    assert clean_redis.xlen(LOTTERY) == 20  # every user's first answer granted once, none twice
    rejected = clean_redis.xrange(REJECTED_STREAM)
    assert len(rejected) == 1 and b"processing failed 3 times: ValueError" in rejected[0][1][b"reason"]
    assert clean_redis.xlen(IN_STREAM) == 0


def test_an_outage_is_not_poison(shards: Shards, redis_server: Any, clean_redis: Any) -> None:
    from playbus.actors.store.errors import StoreError

    real = shards.call
    down = {"n": 6}

    async def call(i: int, method: str, args: Any) -> Any:
        if down["n"] > 0:
            down["n"] -= 1
            raise StoreError("redis refused the commit")
        return await real(i, method, args)

    StreamProducer(clean_redis).send_many([ev(f"o{i}", f"u{i}") for i in range(5)])
    stats = drain(StreamIngress(redis_server.url, shards.router, call), clean_redis, expect=5, timeout=30)
    assert stats["applied"] == 5 and stats["poison"] == 0 and not clean_redis.exists(REJECTED_STREAM)
