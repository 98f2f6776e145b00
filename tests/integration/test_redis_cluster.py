"""playbus on a Redis Cluster (three masters on free ports, created by the tests), without Ray: the commit unit one
call per group in its own slot with other slots reached through the outbox, the deliverer's forwarding, the
partition readers, timer firers and input router, budgets, the script catalog, campaigns, dead letters, durability
checks and the admin reads; NOSCRIPT on every node, and a commit during the migration of its group's slot."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from redis.cluster import RedisCluster

from playbus.actors.engine.events import NO_DATA, EventIn, decode_events
from playbus.actors.engine.keys import group_prefix, groups_of_shard, key_group, user_key
from playbus.actors.engine.state import decode_snapshot
from playbus.actors.service.batcher import MicroBatcher
from playbus.actors.service.delivery import Deliverer
from playbus.actors.service.input_router import IN_OFFSET, IN_STREAM, InputRouter
from playbus.actors.service.partition_reader import PartitionReader
from playbus.actors.service.shard import PreparedBatch, ShardCore
from playbus.actors.service.timer_firer import TimerFirer
from playbus.actors.store import deadletters
from playbus.actors.store.audit import AuditLog
from playbus.actors.store.campaigns import CampaignState
from playbus.actors.store.catalog import ScriptCatalog
from playbus.actors.store.cluster_server import LocalRedisCluster
from playbus.actors.store.commit import REJECTED_STREAM, RedisStore
from playbus.actors.store.connect import AsyncClusterClient, ClusterClient, connect, connect_async, is_cluster
from playbus.actors.store.deadletters import DeadLetters
from playbus.actors.store.durability import RedisSettingsError, check_server
from playbus.actors.store.errors import FencedError
from playbus.actors.store.failed import FailedRuns
from playbus.actors.store.layout import LayoutError, check_layout
from playbus.actors.store.leases import LeasedBudgets, budget_key
from playbus.actors.store.outbox import DEAD_STREAM, Outbox, Settlement
from playbus.client import StreamProducer
from playbus.config.schema import Config, TargetConfig
from tests.support.configs import make_config

pytestmark = pytest.mark.timeout(300)

KG = 16
LOTTERY = "playbus:actions:lottery"
TS = 1_769_000_000_000
SCRIPTS = {
    # per-user order and a grant to a stream target on the first event
    "order": """
function decide(event, ctx)
  local n = ctx:incr("n", 1)
  if event.data.seq ~= n then ctx:set("out_of_order", true) end
  if n == 1 then emit("lottery.grant_chance", {chances = 1}) end
end
""",
    "helped": 'function decide(e, ctx) send(e.data.inviter, "assist.credited", {helper = e.user, seq = e.data.seq})'
              ' end',
    # the inviter counts credits and checks that one helper's credits arrive in order
    "credited": """
function decide(e, ctx)
  ctx:incr("credits", 1)
  local k = "from." .. e.data.helper
  if (ctx:get(k) or 0) + 1 ~= e.data.seq then ctx:set("credits_out_of_order", true) end
  ctx:set(k, e.data.seq)
end
""",
    "arm": 'function decide(e, ctx) later(e.data.delay, "timer.fire", {n = e.data.n}, "k") end',
    "fire": 'function decide(e, ctx) ctx:incr("fired", 1) end',
    "cash": 'function decide(e, ctx) emit("wallet.grant_cash", {amount_cents = 5}) end',
}
RULES = [
    {"id": "order", "on": "tick", "script": "order", "emits": ["lottery.grant_chance"]},
    {"id": "helped", "on": "assist.helped", "script": "helped", "sends": ["assist.credited"]},
    {"id": "credited", "on": "assist.credited", "script": "credited"},
    {"id": "arm", "on": "timer.arm", "script": "arm", "sends": ["timer.fire"]},
    {"id": "fire", "on": "timer.fire", "script": "fire"},
    {"id": "cash", "on": "cash", "script": "cash", "emits": ["wallet.grant_cash"]},
]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return make_config(tmp_path_factory.mktemp("cfg"), SCRIPTS, RULES, campaign="c1",
                       starts="2026-01-01T00:00:00+08:00", ends="2028-01-01T00:00:00+08:00",
                       targets={"lottery": {"stream": LOTTERY}, "wallet": {"webhook": "http://127.0.0.1:9/grant"}},
                       budgets=[{"name": "cash", "action": "wallet.grant_cash", "param": "amount_cents",
                                 "total": 1000}],
                       shards=2, key_groups=KG, batch={"max_events": 200, "max_wait_ms": 1})


@pytest.fixture
def rc(redis_cluster: LocalRedisCluster) -> Iterator[Any]:
    """A cluster client (playbus's) of the module's cluster, emptied, with every node's scripts flushed."""
    client = connect(redis_cluster.url)
    client.flushall()
    client.script_flush()
    yield client
    client.close()


def users_in_group(kg: int, count: int, prefix: str = "u") -> list[str]:
    out, i = [], 0
    while len(out) < count:
        if key_group(user_key("c1", f"{prefix}{i}"), KG) == kg:
            out.append(f"{prefix}{i}")
        i += 1
    return out


def group(user: str) -> int:
    return key_group(user_key("c1", user), KG)


def contexts(client: Any, users: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for u in users:
        key = user_key("c1", u)
        blob = client.hget(group_prefix(group(u)) + "users", key)
        ctx = decode_snapshot(blob)[1] if blob else None
        out[u] = msgpack.unpackb(ctx, raw=False) if ctx else {}
    return out


def every_outbox_empty(client: Any) -> bool:
    return all(client.xlen(group_prefix(kg) + "outbox") == 0 for kg in range(KG))


# -- connecting ------------------------------------------------------------------------------------------------
def test_a_cluster_url_gives_cluster_clients_and_any_other_url_a_plain_one(redis_cluster: LocalRedisCluster) -> None:
    assert is_cluster("redis+cluster://h:1") and is_cluster("rediss+cluster://h:1") and not is_cluster("redis://h:1")
    ports = redis_cluster.ports
    c = connect(f"redis+cluster://127.0.0.1:{ports[1]},127.0.0.1:{ports[2]}/0", socket_timeout=5)
    assert isinstance(c, ClusterClient) and len(c.get_primaries()) == 3
    c.close()
    assert type(connect("redis://127.0.0.1:1/0")) is redis.Redis
    assert isinstance(connect_async(redis_cluster.url), AsyncClusterClient)
    with pytest.raises(ValueError, match="host:port"):
        connect("redis+cluster://nohost")


def test_a_groups_keys_share_one_slot_and_the_groups_spread_over_every_node(rc: Any) -> None:
    names = ["epoch", "batch", "users", "journal", "in", "offset", "timers", "timer_events", "stats", "outbox",
             "failed", "attempts", "retry"]
    nodes = set()
    for kg in range(KG):
        slots = {rc.keyslot(group_prefix(kg) + n) for n in names}
        assert len(slots) == 1
        nodes.add(rc.get_node_from_key(group_prefix(kg) + "users").name)
    assert len(nodes) == 3


# -- the commit ------------------------------------------------------------------------------------------------
def test_a_commit_writes_each_group_in_its_slot_and_what_lives_elsewhere_is_forwarded_from_the_outbox(
        rc: Any) -> None:
    store = RedisStore(rc, KG)
    assert store.per_group_calls and store.cluster
    epochs = store.claim(range(KG))
    a, b = users_in_group(0, 2)
    (c,) = users_in_group(5, 1)
    ka, kc = user_key("c1", a), user_key("c1", c)
    actions = [{"id": "act-1", "type": "lottery.grant_chance", "campaign": "c1", "user": a, "params": {}},
               {"id": "act-2", "type": "lottery.grant_chance", "campaign": "c1", "user": c, "params": {}}]
    sends = [(ka, EventIn("s-1", "c1", c, "assist.credited", TS, NO_DATA, "e1", 1)),  # to another group
             (ka, EventIn("s-2", "c1", b, "assist.credited", TS, NO_DATA, "e1", 1))]  # to its own group
    kw: dict[str, Any] = dict(sends=sends, rejected={3: [b'{"reason": "bad"}']}, offsets={3: "5-0"},
                              batch_id="b-1")
    done = store.commit(epochs, {ka: b"snap-a", kc: b"snap-c"}, [], actions, [], {"lottery": LOTTERY}, {"wallet"},
                        **kw)
    assert sorted(done) == [0, 3, 5]
    # Nothing crossed a slot: the stream, playbus:rejected and group 5's partition are untouched ...
    assert rc.xlen(LOTTERY) == 0 and rc.xlen(REJECTED_STREAM) == 0
    assert rc.xlen(group_prefix(5) + "in") == 0
    # ... the send within group 0 is in its partition, and the rest waits in the groups' outboxes.
    [(_, own)] = rc.xrange(group_prefix(0) + "in")
    assert [e.id for e in decode_events(own[b"events"])] == ["s-2"]
    kinds = {kg: [next(iter(f)) for _, f in rc.xrange(group_prefix(kg) + "outbox")] for kg in (0, 3, 5)}
    assert kinds == {0: [b"action", b"send"], 3: [b"rejected"], 5: [b"action"]}
    assert store.load([ka, kc]) == {ka: b"snap-a", kc: b"snap-c"} and store.offsets([3, 4]) == {3: "5-0", 4: "0-0"}
    # The same commit again (a retry after a lost answer) writes nothing twice.
    store.commit(epochs, {ka: b"snap-a", kc: b"snap-c"}, [], actions, [], {"lottery": LOTTERY}, {"wallet"}, **kw)
    assert sum(rc.xlen(group_prefix(kg) + "outbox") for kg in range(KG)) == 4

    targets = {"lottery": TargetConfig(stream=LOTTERY), "wallet": TargetConfig(webhook="http://127.0.0.1:9/x")}
    deliverer = Deliverer(rc, targets, KG, "d0")
    assert deliverer.run_once()["delivered"] == 2 and deliverer.forwarded == 2
    assert sorted(json.loads(f[b"action"])["id"] for _, f in rc.xrange(LOTTERY)) == ["act-1", "act-2"]
    assert [json.loads(f[b"rejected"]) for _, f in rc.xrange(REJECTED_STREAM)] == [{"reason": "bad"}]
    [(_, sent)] = rc.xrange(group_prefix(5) + "in")
    assert [(e.id, e.user, e.cause) for e in decode_events(sent[b"events"])] == [("s-1", c, "e1")]
    assert every_outbox_empty(rc)


def test_a_restarted_deliverer_forwards_what_it_held_before_anything_newer(rc: Any) -> None:
    store = RedisStore(rc, KG)
    epochs = store.claim(range(KG))
    (a,), (b,) = users_in_group(2, 1), users_in_group(9, 1)
    ka = user_key("c1", a)
    outbox = Outbox(rc, list(range(KG)), "d0")
    outbox.ensure_groups()
    for n in (1, 2):
        store.commit(epochs, {}, sends=[(ka, EventIn(f"s-{n}", "c1", b, "assist.credited", TS, NO_DATA, "e", 1))])
    assert [f.kind for f in outbox.read_new(10, None)] == ["send", "send"]  # read, then the deliverer died
    store.commit(epochs, {}, sends=[(ka, EventIn("s-3", "c1", b, "assist.credited", TS, NO_DATA, "e", 1))])
    # Its successor (the same consumer name, as Ray restarts it) reads one entry per outbox and round, yet
    # forwards the two it held first, then the new one: the sender's order.
    Deliverer(rc, {}, KG, "d0", batch=1).run_once()
    sent = [e.id for _, f in rc.xrange(group_prefix(9) + "in") for e in decode_events(f[b"events"])]
    assert sent == ["s-1", "s-2", "s-3"] and every_outbox_empty(rc)


def test_a_fenced_group_writes_nothing_and_the_others_commit(rc: Any) -> None:
    old, new = RedisStore(rc, KG), RedisStore(rc, KG)
    epochs = old.claim([0, 5])
    new.claim([5])
    (a,), (c,) = users_in_group(0, 1), users_in_group(5, 1)
    with pytest.raises(FencedError) as e:
        old.commit(epochs, {user_key("c1", a): b"x", user_key("c1", c): b"y"})
    assert e.value.group_list == [5]
    assert old.load([user_key("c1", a), user_key("c1", c)]) == {user_key("c1", a): b"x", user_key("c1", c): None}


def test_scripts_are_loaded_again_on_every_node_after_a_flush(rc: Any, config: Config) -> None:
    store = RedisStore(rc, KG)
    epochs = store.claim(range(KG))
    keys = {user_key("c1", u): b"v1" for kg in range(KG) for u in users_in_group(kg, 1)}
    store.commit(epochs, keys)
    catalog = ScriptCatalog(rc)
    assert catalog.deploy("s", "function decide() end") == (True, 1)
    budgets = LeasedBudgets(rc, config)
    assert budgets.refill({("c1", "cash"): 10})
    outbox = Outbox(rc, list(range(KG)), "c0")
    outbox.ensure_groups()
    rc.script_flush()  # every primary forgets its scripts, as after a restart or a failover
    store.commit(epochs, dict.fromkeys(keys, b"v2"))
    assert set(store.load(keys).values()) == {b"v2"}
    assert catalog.add("s", "function decide() end -- 2") == 2 and catalog.activate("s", 2)
    assert budgets.refill({("c1", "cash"): 10})
    assert outbox.scan(due_ms=0, lease_until_ms=0, claim="own", claim_idle_ms=0, count=10) == []


def test_a_commit_in_a_migrating_slot_waits_for_the_move_and_lands_once(
        rc: Any, redis_cluster: LocalRedisCluster) -> None:
    store = RedisStore(rc, KG)
    epochs = store.claim(range(KG))
    (a,) = users_in_group(7, 1)
    ka = user_key("c1", a)
    journal = [{"campaign": "c1", "user": a, "event": "e0", "ts": TS, "rule": None, "actions": []}]
    store.commit(epochs, {ka: b"before"}, journal)
    slot = rc.keyslot(group_prefix(7) + "users")
    src = redis_cluster.owner(slot)
    dst = (src + 1) % 3
    s, d = redis_cluster.node_client(src), redis_cluster.node_client(dst)
    d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", redis_cluster.node_ids[src])
    s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", redis_cluster.node_ids[dst])
    # Half of the group's keys move: its multi-key commit is answered TRYAGAIN until the slot is settled.
    s.execute_command("MIGRATE", "127.0.0.1", redis_cluster.ports[dst], "", 0, 5000, "KEYS",
                      group_prefix(7) + "users", group_prefix(7) + "journal")
    out: dict[str, Any] = {}

    def commit() -> None:
        t = time.monotonic()
        out["done"] = store.commit(epochs, {ka: b"after"}, journal, batch_id="mid-move")
        out["s"] = time.monotonic() - t

    th = threading.Thread(target=commit)
    th.start()
    time.sleep(1.0)
    assert th.is_alive(), "the commit should wait while the slot is split"
    for key in s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        s.execute_command("MIGRATE", "127.0.0.1", redis_cluster.ports[dst], "", 0, 5000, "KEYS", key)
    for i in (dst, src, 3 - src - dst):
        n = redis_cluster.node_client(i)
        n.execute_command("CLUSTER", "SETSLOT", slot, "NODE", redis_cluster.node_ids[dst])
        n.close()
    th.join(30)
    assert out.get("done") == [7] and out["s"] >= 1.0
    assert store.load([ka]) == {ka: b"after"} and rc.xlen(group_prefix(7) + "journal") == 2
    assert redis_cluster.owner(slot) == dst and d.hget(group_prefix(7) + "users", ka) == b"after"
    store.commit(epochs, {ka: b"after"}, journal, batch_id="mid-move")  # a retry: a no-op by its token
    assert rc.xlen(group_prefix(7) + "journal") == 2
    s.close()
    d.close()


# -- shards, readers, firers, router, deliverer ------------------------------------------------------------------
class Shard:
    """One shard as the actor runs it: core, batcher, partition reader, timer firer."""

    def __init__(self, config: Config, i: int, url: str) -> None:
        self.core = ShardCore(config, i, url)
        self.batcher: MicroBatcher[PreparedBatch] = MicroBatcher(self.core, 200, 0.001)
        groups = sorted(self.core.groups)
        self.reader = PartitionReader(url, groups, self.batcher.submit, {"c1"}, chunk=100, key_groups=KG)
        self.firer = TimerFirer(url, groups, self.batcher.submit, poll_s=0.05)

    async def close(self) -> None:
        await self.batcher.drain()
        await self.reader.close()
        await self.firer.close()
        self.batcher.close()
        self.core.close()


def run_cluster(config: Config, url: str, client: Any, done: Any, timeout: float = 60) -> list[Shard]:
    """Both shards' readers and firers and a deliverer, until `done()` or the timeout."""
    deliverer = Deliverer(connect(url), config.targets, KG, "d0", poll_s=0.02)

    async def main() -> list[Shard]:
        shards = [Shard(config, i, url) for i in range(config.shards)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(x.run(stop)) for s in shards for x in (s.reader, s.firer)]
        delivery = threading.Thread(target=deliverer.run_forever, daemon=True)
        delivery.start()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end and not await asyncio.to_thread(done):
            await asyncio.sleep(0.05)
        stop.set()
        deliverer.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        await asyncio.to_thread(delivery.join, 20)
        for s in shards:
            await s.close()
        return shards

    return asyncio.run(main())


def test_partitions_timers_and_sends_across_groups_are_decided_once_each_in_order(
        rc: Any, config: Config, redis_cluster: LocalRedisCluster) -> None:
    users = [f"t{i}" for i in range(24)]
    inviters = ["inv-a", "inv-b", "inv-c"]
    helpers = [f"h{i}" for i in range(6)]
    assert len({group(u) for u in inviters + helpers}) > 3  # the sends cross groups (and nodes)
    events: list[dict[str, Any]] = []
    for seq in range(1, 11):
        events += [{"id": f"{u}-{seq}", "campaign": "c1", "user": u, "type": "tick", "ts": TS, "data": {"seq": seq}}
                   for u in users]
        events += [{"id": f"{h}-help-{seq}", "campaign": "c1", "user": h, "type": "assist.helped", "ts": TS,
                    "data": {"inviter": inviters[i % 3], "seq": seq}} for i, h in enumerate(helpers)]
    now = int(time.time() * 1000)
    events += [{"id": f"{u}-arm", "campaign": "c1", "user": u, "type": "timer.arm", "ts": now - 5000,
                "data": {"delay": 1000, "n": 1}} for u in users[:8]]
    StreamProducer(rc, key_groups=KG, batch=53).send_many(events)

    def done() -> bool:
        ctx = contexts(rc, users + inviters)
        return (all(ctx[u].get("n") == 10 for u in users) and all(ctx[u].get("fired") == 1 for u in users[:8])
                and sum(ctx[i].get("credits", 0) for i in inviters) == 60 and every_outbox_empty(rc))

    run_cluster(config, redis_cluster.url, rc, done)
    ctx = contexts(rc, users + inviters)
    assert all(ctx[u]["n"] == 10 and "out_of_order" not in ctx[u] for u in users), ctx
    assert [ctx[u].get("fired") for u in users] == [1] * 8 + [None] * 16
    assert [ctx[i]["credits"] for i in inviters] == [20, 20, 20]
    assert not any("credits_out_of_order" in ctx[i] for i in inviters)
    grants = [json.loads(f[b"action"])["user"] for _, f in rc.xrange(LOTTERY)]
    assert sorted(grants) == sorted(users)  # one each, through the outbox, none twice
    assert every_outbox_empty(rc) and sum(rc.zcard(group_prefix(kg) + "timers") for kg in range(KG)) == 0

    # A forward that lands twice (a deliverer killed between its XADD and its XACK) is a duplicate for the target.
    inv = inviters[0]
    core = ShardCore(config, next(i for i in range(2) if group(inv) in groups_of_shard(i, 2, KG)), redis_cluster.url)
    firsts = [d["event"] for d in core.store.journal(user_key("c1", inv), 100) if d["rule"] == "credited"]
    assert len(firsts) == 20
    again = [EventIn(eid, "c1", inv, "assist.credited", TS, NO_DATA, "x", 1) for eid in firsts[:3]]
    assert [r["status"] for r in core.process(again)] == ["duplicate"] * 3
    assert contexts(rc, [inv])[inv]["credits"] == 20
    core.close()


def test_playbus_in_is_routed_on_a_cluster_and_rejections_go_to_their_stream(rc: Any, redis_cluster: Any) -> None:
    for i in range(40):
        rc.xadd(IN_STREAM, {"event": json.dumps({"id": f"r{i}", "campaign": "c1", "user": f"u{i % 7}", "type": "tick",
                                                 "ts": TS, "data": {"seq": i}})})
    rc.xadd(IN_STREAM, {"event": b"{not json"})

    async def route() -> dict[str, int]:
        router = InputRouter(redis_cluster.url, KG, count=9)
        stop = asyncio.Event()
        task = asyncio.create_task(router.run(stop))
        for _ in range(200):
            if rc.xlen(IN_STREAM) == 0:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 5)
        await router.close()
        return router.stats

    assert asyncio.run(route()) == {"routed": 40, "rejected": 1, "batches": 5}
    routed = {}
    for kg in range(KG):
        for _, f in rc.xrange(group_prefix(kg) + "in"):
            for e in msgpack.unpackb(f[b"events"]):
                ev = msgpack.unpackb(e) if isinstance(e, bytes) else e
                routed[ev["id"]] = kg
    assert len(routed) == 40 and all(group(f"u{int(i[1:]) % 7}") == kg for i, kg in routed.items())
    assert rc.get(IN_OFFSET) is not None
    [(_, rec)] = rc.xrange(REJECTED_STREAM)
    assert json.loads(rec[b"rejected"])["reason"].startswith("event is neither JSON nor msgpack")


# -- budgets, catalog, campaigns, dead letters, durability, admin reads ---------------------------------------------
def test_leases_and_campaign_state_stay_in_one_slot_each(rc: Any, config: Config) -> None:
    budgets = LeasedBudgets(rc, config, block_fraction=0.1)
    assert rc.get(budget_key("c1", "cash")) == b"1000"
    assert budgets.refill({("c1", "cash"): 1})
    held = budgets.held("c1", "cash")
    assert 1 <= held <= 100
    state = CampaignState(rc)
    state.init_budgets([("c1", "cash", 1000)])
    assert state.top_up("c1", "cash", 500) == 1500
    assert state.budgets("c1", ["cash"]) == {"cash": (1500, 1500 - held)}
    assert budgets.release() == {("c1", "cash"): held} and budgets.remaining("c1", "cash") == 1500
    g = state.generation()
    assert state.put({"id": "c2", "timezone": "UTC"}) and state.set_paused("c2", True)
    assert state.get("c2") == {"paused": True} and state.generation() == g + 2
    assert ScriptCatalog(rc).deploy("x", "-- 1") == (True, 1)


def test_dead_letters_are_listed_and_redriven_once_on_a_cluster(rc: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = Outbox(rc, list(range(KG)), "d0")
    outbox.ensure_groups()
    dead = []
    for i, kg in enumerate((1, 6, 11)):
        raw = json.dumps({"id": f"a{i}", "type": "wallet.grant_cash", "campaign": "c1", "user": "u"}).encode()
        entry = rc.xadd(group_prefix(kg) + "outbox", {"action": raw}).decode()
        dead.append((kg, entry, f"a{i}", raw, "HTTP 500", 3))
    outbox.read_new(10, None)
    outbox.settle(Settlement(dead=dead))
    assert every_outbox_empty(rc)
    letters = DeadLetters(rc)
    assert [d["action"]["id"] for d in letters.list()] == ["a2", "a1", "a0"] and letters.count() == 3
    # Two redrives at once: each action is queued once.
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: results.append(DeadLetters(rc).redrive(ids=["a0", "a1"])))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["redriven"] for r in results) in ([0, 2], [1, 1])
    queued = [json.loads(f[b"action"])["id"] for kg in (1, 6) for _, f in rc.xrange(group_prefix(kg) + "outbox")]
    assert sorted(queued) == ["a0", "a1"] and letters.count() == 1
    # A redrive stopped after its first step leaves the action aside, never lost: a later one finishes it.
    monkeypatch.setattr(DeadLetters, "_requeue", lambda self, fields: None)
    assert letters.redrive(all=True)["redriven"] == 1 and letters.count() == 0
    assert rc.hlen(letters.redriving) == 1
    monkeypatch.undo()
    monkeypatch.setattr(deadletters, "LEFTOVER_S", 0.0)
    assert letters.redrive(ids=["nothing"]) == {"redriven": 0, "ids": [], "not_found": ["nothing"]}
    assert [json.loads(f[b"action"])["id"] for _, f in rc.xrange(group_prefix(11) + "outbox")] == ["a2"]
    assert rc.hlen(letters.redriving) == 0 and rc.xlen(DEAD_STREAM) == 0


def test_durability_is_checked_on_every_primary(rc: Any, redis_cluster: LocalRedisCluster) -> None:
    assert check_server(rc, "everysec") is False
    with pytest.raises(RedisSettingsError, match="every primary must run appendonly yes and appendfsync always"):
        check_server(rc, "always")
    nodes = [redis_cluster.node_client(i) for i in range(3)]
    try:
        for n in nodes:
            n.config_set("appendfsync", "always")
        assert check_server(rc, "always") is False  # no WAITAOF on a cluster: each node fsyncs before it answers
        nodes[2].config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(RedisSettingsError, match=f"node 127.0.0.1:{redis_cluster.ports[2]}.*noeviction"):
            check_server(rc, "everysec")
    finally:
        for n in nodes:
            n.config_set("appendfsync", "everysec")
            n.config_set("maxmemory-policy", "noeviction")
            n.close()
    with pytest.raises(ValueError, match="WAITAOF"):
        RedisStore(rc, KG, wait_fsync_ms=100)


def test_admin_reads_span_every_group_on_a_cluster(rc: Any) -> None:
    check_layout(rc, KG)
    with pytest.raises(LayoutError):
        check_layout(rc, KG * 2)
    store = RedisStore(rc, KG)
    epochs = store.claim(range(KG))
    users = [users_in_group(kg, 1)[0] for kg in range(KG)]
    journal = [{"campaign": "c1", "user": u, "event": f"e-{u}", "ts": TS, "rule": "order", "script_version": 1,
                "actions": [], "changes": {"n": 1}, "error": None} for u in users]
    failed = [{"event": {"id": f"f-{u}", "campaign": "c1", "user": u}, "rule": "order", "script_version": 1,
               "error": "boom"} for u in users]
    recorded = [(user_key("c1", u), EventIn(f"e-{u}", "c1", u, "tick", TS, NO_DATA)) for u in users]
    store.commit(epochs, {user_key("c1", u): b"s" for u in users}, journal, failed=failed, recorded=recorded)
    found = store.journals([user_key("c1", u) for u in users])
    assert all(len(v) == 1 for v in found.values()) and len(found) == KG
    assert len(FailedRuns(rc, KG).list(limit=100)) == KG
    from playbus.actors.store.recorded import read_recorded, recorded_events

    assert sorted(e.id for e in recorded_events(rc, KG, "c1", 100)) == sorted(f"e-{u}" for u in users)
    rec = read_recorded(rc, KG, "c1", 4)  # with the rewind, which reads journals to their start (XINFO STREAM)
    assert len(rec.events) == 4 and rec.complete and set(rec.written) == {user_key("c1", e.user) for e in rec.events}
    assert [k for kg in range(KG) for k, _ in store.scan_users(kg)] == [user_key("c1", u) for u in users]
    audit = AuditLog(rc)
    audit.record("ops", "script.push", "x")
    assert [e["who"] for e in audit.recent()] == ["ops"]
    assert isinstance(rc, RedisCluster)


def test_a_real_cluster_is_three_masters_and_a_moved_slot_is_served_by_its_new_node(
        redis_cluster: LocalRedisCluster, tmp_path: Path) -> None:
    c = redis_cluster.client()
    c.set("{moved}k", "v")
    slot = c.keyslot("{moved}k")
    to = (redis_cluster.owner(slot) + 1) % 3
    assert redis_cluster.move_slot(slot, to) == 1
    assert redis_cluster.owner(slot) == to and c.get("{moved}k") == b"v"
    with LocalRedisCluster(tmp_path / "one", masters=1) as one:
        assert one.client().ping()
