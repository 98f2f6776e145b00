"""The input as a partitioned log read by its owner: producers' record batches and `playbus:in` (through the
router) reach the shards' partition readers, consume-decide-commit is one step (the offset is committed in the
unit), per-user order holds, nothing is lost or doubled across failures and restarts. Real Redis, two
in-process shards (ShardCore + MicroBatcher + PartitionReader, as the actor runs them), no Ray."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from playbus.actors.engine.keys import group_prefix, key_group, user_key
from playbus.actors.service.batcher import MicroBatcher
from playbus.actors.service.input_router import IN_STREAM, InputRouter
from playbus.actors.service.partition_reader import PartitionReader
from playbus.actors.service.shard import PreparedBatch, ShardCore
from playbus.actors.store.commit import REJECTED_STREAM
from playbus.actors.store.server import RedisServer
from playbus.client import StreamProducer
from playbus.client.streams import partition_of
from playbus.config.schema import Config
from tests.support.configs import T0, make_config

LOTTERY = "playbus:actions:lottery"
KG = 16
# Records the order in which a user's events were decided, and grants on the first.
ORDER = """
function decide(event, ctx)
  local n = ctx:incr("n", 1)
  ctx:set("last", event.data.seq)
  if event.data.seq ~= n then ctx:set("out_of_order", true) end
  if n == 1 then emit("lottery.grant_chance", {chances = 1}) end
end
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return make_config(tmp_path_factory.mktemp("cfg"), {"order": ORDER},
                       [{"id": "order", "on": "tick", "script": "order", "emits": ["lottery.grant_chance"]}],
                       targets={"lottery": {"stream": LOTTERY}}, shards=2, key_groups=KG,
                       batch={"max_events": 100, "max_wait_ms": 1})


def tick(user: str, seq: int, eid: str | None = None) -> dict[str, Any]:
    return {"id": eid or f"{user}-{seq}", "campaign": "c1", "user": user, "type": "tick", "ts": T0,
            "data": {"seq": seq}}


class Shard:
    """One shard as the actor runs it: core, batcher, partition reader."""

    def __init__(self, config: Config, i: int, url: str, submit: Callable[..., Any] | None = None) -> None:
        self.core = ShardCore(config, i, url)
        self.batcher: MicroBatcher[PreparedBatch] = MicroBatcher(self.core, 100, 0.001)
        self.reader = PartitionReader(url, sorted(self.core.groups), submit or self.batcher.submit, {"c1"},
                                      chunk=100, key_groups=KG)


def run_shards(config: Config, url: str, done: Callable[[], bool], timeout: float = 30,
               wrap: Callable[[Shard], Callable[..., Any]] | None = None) -> list[Shard]:
    """Run both shards' readers until `done()` (checked from the loop) or the timeout; the shards."""
    async def main() -> list[Shard]:
        shards = [Shard(config, i, url) for i in range(config.shards)]
        if wrap is not None:
            for s in shards:
                s.reader.submit = wrap(s)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(s.reader.run(stop)) for s in shards]
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end and not await asyncio.to_thread(done):
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        for s in shards:
            await s.batcher.drain()
            await s.reader.close()
            s.batcher.close()
            s.core.close()
        return shards

    return asyncio.run(main())


def contexts(client: Any, config: Config, users: list[str]) -> dict[str, dict[str, Any]]:
    from playbus.actors.engine.state import decode_snapshot

    out = {}
    for u in users:
        key = user_key("c1", u)
        blob = client.hget(group_prefix(key_group(key, KG)) + "users", key)
        ctx = decode_snapshot(blob)[1] if blob else None
        out[u] = msgpack.unpackb(ctx, raw=False) if ctx else {}
    return out


def test_the_client_partitions_like_playbus() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        c, u = f"c{rng.randrange(9)}", f"u{rng.randrange(10**9)}é"
        for n in (1, 16, 128, 1000):
            assert partition_of(c, u, n) == key_group(user_key(c, u), n)


def test_record_batches_are_decided_once_each_in_order_and_the_offset_is_committed_with_them(
        config: Config, redis_server: RedisServer, clean_redis: Any) -> None:
    users = [f"u{i}" for i in range(30)]
    events = [tick(u, s) for s in range(1, 21) for u in users]  # each user's events in order, interleaved
    StreamProducer(clean_redis, key_groups=KG, batch=37).send_many(events)
    assert sum(clean_redis.xlen(group_prefix(kg) + "in") for kg in range(KG)) < len(events) / 10  # batches

    def done() -> bool:
        ctx = contexts(clean_redis, config, users)
        return all(c.get("n") == 20 for c in ctx.values())

    run_shards(config, redis_server.url, done)
    ctx = contexts(clean_redis, config, users)
    assert all(c == {"n": 20, "last": 20} for c in ctx.values()), ctx  # never out of order
    assert clean_redis.xlen(LOTTERY) == len(users)
    for kg in range(KG):
        offset = clean_redis.get(group_prefix(kg) + "offset")
        last = clean_redis.xrevrange(group_prefix(kg) + "in", count=1)
        if offset is not None:  # consumed: trimmed up to the committed offset, which is the last entry
            assert last and last[0][0] == offset and clean_redis.xlen(group_prefix(kg) + "in") == 1


def test_a_restarted_reader_resumes_at_the_committed_offset(config: Config, redis_server: RedisServer,
                                                            clean_redis: Any) -> None:
    users = [f"r{i}" for i in range(10)]
    producer = StreamProducer(clean_redis, key_groups=KG, batch=10)
    producer.send_many([tick(u, s) for s in range(1, 6) for u in users])
    run_shards(config, redis_server.url, lambda: all(c.get("n") == 5 for c in contexts(clean_redis, config,
                                                                                       users).values()))
    producer.send_many([tick(u, s) for s in range(6, 9) for u in users])  # while no shard runs
    committed: list[int] = []

    def wrap(shard: Shard) -> Callable[..., Any]:
        async def submit(events: list[Any], offset: Any, rejected: list[bytes]) -> Any:
            committed.extend(msgpack.unpackb(bytes(e.data))["seq"] for e in events)
            return await shard.batcher.submit(events, offset, rejected)
        return submit

    run_shards(config, redis_server.url, lambda: all(c.get("n") == 8 for c in contexts(clean_redis, config,
                                                                                       users).values()), wrap=wrap)
    assert sorted(set(committed)) == [6, 7, 8]  # nothing committed before was read again
    assert all(c == {"n": 8, "last": 8} for c in contexts(clean_redis, config, users).values())
    assert clean_redis.xlen(LOTTERY) == len(users)


def test_a_chunk_whose_commit_fails_is_read_again_and_applied_once(config: Config, redis_server: RedisServer,
                                                                   clean_redis: Any) -> None:
    users = [f"f{i}" for i in range(20)]
    StreamProducer(clean_redis, key_groups=KG, batch=5).send_many([tick(u, s) for s in range(1, 11) for u in users])
    failed = {"n": 0}

    def wrap(shard: Shard) -> Callable[..., Any]:
        async def submit(events: list[Any], offset: Any, rejected: list[bytes]) -> Any:
            if failed["n"] < 6 and events:
                failed["n"] += 1
                used = int(clean_redis.info("memory")["used_memory"])
                clean_redis.config_set("maxmemory", used + 1024)  # this commit is refused
                try:
                    return await shard.batcher.submit(events, offset, rejected)
                finally:
                    clean_redis.config_set("maxmemory", 0)
            return await shard.batcher.submit(events, offset, rejected)
        return submit

    run_shards(config, redis_server.url, lambda: all(c.get("n") == 10 for c in contexts(clean_redis, config,
                                                                                        users).values()), wrap=wrap)
    assert failed["n"] == 6
    assert all(c == {"n": 10, "last": 10} for c in contexts(clean_redis, config, users).values())
    assert clean_redis.xlen(LOTTERY) == len(users)


def test_invalid_events_are_committed_to_rejected_with_the_batch_that_consumes_them(
        config: Config, redis_server: RedisServer, clean_redis: Any) -> None:
    kg = partition_of("c1", "v1", KG)
    stream = group_prefix(kg) + "in"
    clean_redis.xadd(stream, {"events": msgpack.packb([tick("v1", 1), {"id": "bad", "campaign": "c1"},
                                                       {**tick("v1", 2), "campaign": "nope"}, tick("v1", 2)])})
    clean_redis.xadd(stream, {"events": b"\xc1 not msgpack"})
    clean_redis.xadd(stream, {"nothing": b"x"})
    run_shards(config, redis_server.url, lambda: clean_redis.xlen(REJECTED_STREAM) >= 4)
    records = [json.loads(f[b"rejected"]) for _, f in clean_redis.xrange(REJECTED_STREAM)]
    reasons = sorted(r["reason"].split(":")[0] for r in records)
    assert reasons == ["campaign", "entry has neither field \"events\" nor \"event\"",
                       "field 'events' is not a msgpack array of events", "user"]
    assert all(r["partition"] == kg for r in records)
    assert contexts(clean_redis, config, ["v1"])["v1"] == {"n": 2, "last": 2}


def test_an_event_in_another_groups_partition_is_rejected_and_the_good_entries_beside_it_are_applied(
        config: Config, redis_server: RedisServer, clean_redis: Any) -> None:
    users = [f"m{i}" for i in range(24)]
    StreamProducer(clean_redis, key_groups=KG, batch=4).send_many([tick(u, s) for s in (1, 2) for u in users])
    home = partition_of("c1", "m0", KG)
    wrong = [(home + 1) % KG, (home + KG // 2) % KG]  # a partition of the same shard and one of the other
    for i, kg in enumerate(wrong):
        clean_redis.xadd(group_prefix(kg) + "in", {"events": msgpack.packb([tick("m0", 3, eid=f"misrouted{i}")])})
    StreamProducer(clean_redis, key_groups=KG, batch=4).send_many([tick(u, 3) for u in users])

    run_shards(config, redis_server.url, lambda: all(c.get("n") == 3 for c in contexts(clean_redis, config,
                                                                                       users).values())
               and clean_redis.xlen(REJECTED_STREAM) >= 2)
    assert all(c == {"n": 3, "last": 3} for c in contexts(clean_redis, config, users).values())
    records = sorted((json.loads(f[b"rejected"]) for _, f in clean_redis.xrange(REJECTED_STREAM)),
                     key=lambda r: r["event"]["id"])
    assert [(r["event"]["id"], r["partition"]) for r in records] == [("misrouted0", wrong[0]),
                                                                    ("misrouted1", wrong[1])]
    assert all(r["reason"] == f"partition: the user's events belong in partition {home}, not {r['partition']}"
               for r in records)


def test_a_rejection_record_of_a_huge_entry_stays_valid_json() -> None:
    from playbus.actors.service.partition_reader import MAX_REJECTION, rejection

    record = rejection("1-0", 3, {"id": "big", "data": {"blob": "é" * 300_000}}, "data: too large")
    doc = json.loads(record)
    assert len(record) <= MAX_REJECTION and doc["event_truncated"] and doc["partition"] == 3
    assert doc["reason"] == "data: too large" and doc["event"].startswith('{"id": "big"')
    small = json.loads(rejection("1-0", None, {"id": "x"}, "why"))
    assert small == {"entry": "1-0", "partition": None, "event": {"id": "x"}, "reason": "why"}


def test_a_poison_entry_that_fails_its_whole_micro_batch_takes_no_other_partitions_entries_with_it(
        config: Config, redis_server: RedisServer, clean_redis: Any) -> None:
    users = [f"q{i}" for i in range(16)]
    producer = StreamProducer(clean_redis, key_groups=KG, batch=50)
    producer.send_many([tick(u, 1) for u in users])
    producer.send_many([tick("q3", 2, eid="poison")])
    producer.send_many([tick(u, s) for s in (2, 3) for u in users if u != "q3"] + [tick("q3", 2), tick("q3", 3)])

    def wrap(shard: Shard) -> Callable[..., Any]:
        real = shard.core.prepare

        def prepare(events: list[Any], now_ms: int | None = None) -> Any:
            if any(e.id == "poison" for e in events):
                raise ValueError("the engine chokes on this event")  # fails the whole micro-batch
            return real(events, now_ms)

        shard.core.prepare = prepare  # type: ignore[method-assign]
        return shard.batcher.submit

    run_shards(config, redis_server.url, lambda: all(c.get("n") == 3 for c in contexts(clean_redis, config,
                                                                                       users).values()), wrap=wrap)
    assert all(c == {"n": 3, "last": 3} for c in contexts(clean_redis, config, users).values())
    records = [json.loads(f[b"rejected"]) for _, f in clean_redis.xrange(REJECTED_STREAM)]
    assert [r["reason"].split(":")[0] for r in records] == ["processing failed 3 times"]  # the poison alone


def test_a_poison_entry_is_rejected_after_three_failures_and_the_entries_behind_it_go_on(
        config: Config, redis_server: RedisServer, clean_redis: Any) -> None:
    users = [f"p{i}" for i in range(8)]
    producer = StreamProducer(clean_redis, key_groups=KG, batch=3)
    producer.send_many([tick(u, 1) for u in users])
    producer.send_many([tick("p3", 2, eid="poison")])
    producer.send_many([tick(u, s) for s in (2, 3) for u in users if u != "p3"] + [tick("p3", 2), tick("p3", 3)])

    def wrap(shard: Shard) -> Callable[..., Any]:
        async def submit(events: list[Any], offset: Any, rejected: list[bytes]) -> Any:
            if any(e.id == "poison" for e in events):
                raise ValueError("the engine chokes on this event")  # a bug, not an outage
            return await shard.batcher.submit(events, offset, rejected)
        return submit

    run_shards(config, redis_server.url, lambda: all(c.get("n") == 3 for c in contexts(clean_redis, config,
                                                                                       users).values()), wrap=wrap)
    assert all(c == {"n": 3, "last": 3} for c in contexts(clean_redis, config, users).values())
    (record,) = [json.loads(f[b"rejected"]) for _, f in clean_redis.xrange(REJECTED_STREAM)]
    assert record["reason"].startswith("processing failed 3 times: ValueError")


def test_playbus_in_is_routed_into_the_partitions_in_order(config: Config, redis_server: RedisServer,
                                                           clean_redis: Any) -> None:
    users = [f"i{i}" for i in range(12)]
    for s in range(1, 11):
        for u in users:
            body = json.dumps(tick(u, s)) if s % 2 else msgpack.packb(tick(u, s))
            clean_redis.xadd(IN_STREAM, {"event": body})
    clean_redis.xadd(IN_STREAM, {"event": b"{not json"})

    async def route() -> dict[str, int]:
        router = InputRouter(redis_server.url, KG, count=17)
        stop = asyncio.Event()
        task = asyncio.create_task(router.run(stop))
        while clean_redis.xlen(IN_STREAM) > 0:
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 5)
        await router.close()
        return router.stats

    stats = asyncio.run(route())
    assert stats["routed"] == 120 and stats["rejected"] == 1
    run_shards(config, redis_server.url, lambda: all(c.get("n") == 10 for c in contexts(clean_redis, config,
                                                                                        users).values()))
    assert all(c == {"n": 10, "last": 10} for c in contexts(clean_redis, config, users).values())
    (record,) = [json.loads(f[b"rejected"]) for _, f in clean_redis.xrange(REJECTED_STREAM)]
    assert record["reason"].startswith("event is neither JSON nor msgpack")
