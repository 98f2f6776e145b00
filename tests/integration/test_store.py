"""RedisStore against a real redis-server: fencing, snapshots, journal, outbox, streams, durability."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.keys import key_group
from playbus.actors.store.commit import RedisStore
from playbus.actors.store.errors import FencedError, StoreError
from playbus.actors.store.server import RedisServer
from playbus.config import Config
from tests.support.configs import make_config

KG = 8
LOTTERY = "playbus:actions:lottery"
TARGETS = {"lottery": LOTTERY}
WEBHOOKS = {"wallet"}
TS = 1_700_000_000_000

SCRIPT = """
function decide(event, ctx)
  local n = ctx:incr("quiz.answered", 1)
  if event.data and event.data.boom then error("boom") end
  if n == 1 then emit("lottery.grant_chance", {chances = 1}) end
  emit("wallet.grant_cash", {amount_cents = 5})
end
"""



@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return make_config(tmp_path_factory.mktemp("cfg"), {"quiz": SCRIPT},
                       [{"id": "quiz", "on": "quiz.answered", "script": "quiz",
                         "emits": ["lottery.grant_chance", "wallet.grant_cash"]}],
                       starts="2020-01-01T00:00:00+00:00", ends="2030-01-01T00:00:00+00:00", key_groups=8, shards=2)


def ev(i: int, user: str, **data: Any) -> dict[str, Any]:
    return {"id": f"e{i}", "campaign": "c1", "user": user, "type": "quiz.answered", "ts": TS, "data": data}


def users_in_group(kg: int, count: int, n: int = KG) -> list[str]:
    """User ids of campaign c1 whose key falls in group `kg`."""
    out, i = [], 0
    while len(out) < count:
        if key_group(f"c1\x00u{i}", n) == kg:
            out.append(f"u{i}")
        i += 1
    return out


def run_batch(engine: ShardEngine, store: RedisStore, epochs: dict[int, int], events: list[dict[str, Any]],
              **kw: Any) -> Any:
    """Load missing users, process, commit: what a shard does per micro-batch."""
    for key, blob in store.load(engine.missing(events)).items():
        engine.restore(key, blob)
    out = engine.process(events, TS)
    store.commit(epochs, engine.snapshot(), out.journal, out.actions, out.failed, TARGETS, WEBHOOKS, **kw)
    return out


def test_key_groups_are_stable_crc32() -> None:
    assert key_group("spring2026\x00u42", 128) == key_group("spring2026\x00u42", 128)
    assert key_group("c1\x00u0", 1) == 0
    assert key_group("a", 1 << 32) == 0xE8B7BE43  # crc32(b"a"): the same on every machine


def test_claim_increments_epochs(clean_redis: Any) -> None:
    store = RedisStore(clean_redis, KG)
    assert store.claim([0, 1]) == {0: 1, 1: 1}
    assert store.claim([1, 2]) == {1: 2, 2: 1}
    assert store.epoch(1) == 2


def test_older_owner_commit_is_rejected_and_writes_nothing(clean_redis: Any, config: Config) -> None:
    old, new = RedisStore(clean_redis, KG), RedisStore(clean_redis, KG)
    old_epochs = old.claim(range(KG))
    new_epochs = new.claim([3])
    user = users_in_group(3, 1)[0]
    engine = ShardEngine(config)
    out = engine.process([ev(1, user)], TS)
    with pytest.raises(FencedError) as info:
        old.commit(old_epochs, engine.snapshot([f"c1\x00{user}"]), out.journal, out.actions, out.failed,
                   TARGETS, WEBHOOKS)
    assert info.value.group_list == [3]
    assert clean_redis.hlen(old.users_key(3)) == 0
    assert clean_redis.exists(old.journal_key(3), old.outbox_key(3), LOTTERY) == 0
    # The new owner commits the same work.
    new.commit(new_epochs, engine.snapshot([f"c1\x00{user}"]), out.journal, out.actions, out.failed,
               TARGETS, WEBHOOKS)
    assert new.snapshot_of(f"c1\x00{user}") is not None
    assert clean_redis.xlen(LOTTERY) == 1


def test_fenced_groups_do_not_block_the_others(clean_redis: Any, config: Config) -> None:
    old, new = RedisStore(clean_redis, KG), RedisStore(clean_redis, KG)
    epochs = old.claim(range(KG))
    new.claim([5])
    kept, lost = users_in_group(2, 1)[0], users_in_group(5, 1)[0]
    engine = ShardEngine(config)
    out = engine.process([ev(1, kept), ev(2, lost)], TS)
    with pytest.raises(FencedError) as info:
        old.commit(epochs, engine.snapshot(), out.journal, out.actions, out.failed, TARGETS, WEBHOOKS)
    assert info.value.groups == "5"
    assert old.snapshot_of(f"c1\x00{kept}") is not None
    assert old.snapshot_of(f"c1\x00{lost}") is None


def test_fenced_error_pickles_with_its_groups() -> None:
    err = pickle.loads(pickle.dumps(FencedError("groups 1, 7 fenced", "1,7")))
    assert isinstance(err, FencedError) and err.group_list == [1, 7] and str(err) == "groups 1, 7 fenced"


def test_a_new_engine_resumes_from_loaded_snapshots(clean_redis: Any, config: Config) -> None:
    store = RedisStore(clean_redis, KG)
    epochs = store.claim(range(KG))
    users = [f"u{i}" for i in range(20)]
    first = [ev(i, users[i % 20]) for i in range(40)]
    run_batch(ShardEngine(config), store, epochs, first)

    fresh = ShardEngine(config)  # e.g. after a crash: nothing in memory
    again = run_batch(fresh, store, epochs, first)
    assert {r["status"] for r in again.results} == {"duplicate"}
    more = run_batch(fresh, store, epochs, [ev(100 + i, u) for i, u in enumerate(users)])
    assert {r["status"] for r in more.results} == {"applied"}
    assert fresh.context("c1", "u0") == {"quiz.answered": 3}
    # The first quiz answer granted the only lottery chance: none now, and none re-sent by the replay.
    assert not [a for a in more.actions if a["type"] == "lottery.grant_chance"]
    assert clean_redis.xlen(LOTTERY) == 20


def test_load_returns_none_for_unknown_users(clean_redis: Any) -> None:
    store = RedisStore(clean_redis, KG)
    assert store.load(["c1\x00nobody", "c1\x00ghost"]) == {"c1\x00nobody": None, "c1\x00ghost": None}
    assert store.load([]) == {}


def test_the_journal_is_one_entry_per_group_and_batch_read_back_newest_first(clean_redis: Any,
                                                                              config: Config) -> None:
    store = RedisStore(clean_redis, KG)
    epochs = store.claim(range(KG))
    engine = ShardEngine(config)
    run_batch(engine, store, epochs, [ev(i, "u1") for i in range(3)])
    run_batch(engine, store, epochs, [ev(i, "u1") for i in range(3, 12)] + [ev(99, "u2")])
    entries = store.journal("c1\x00u1", 5)
    assert [e["event"] for e in entries] == ["e11", "e10", "e9", "e8", "e7"]
    assert entries[0]["changes"] == {"quiz.answered": 12}
    assert [e["event"] for e in store.journal("c1\x00u1", 20)] == [f"e{i}" for i in range(11, -1, -1)]
    kg = key_group("c1\x00u1", KG)
    assert clean_redis.xlen(store.journal_key(kg)) == 2  # one entry per committed batch, not one per event
    assert store.journals(["c1\x00u2"])["c1\x00u2"][0]["event"] == "e99"


def test_the_journal_is_trimmed_to_about_journal_maxlen_batches(clean_redis: Any, config: Config) -> None:
    store = RedisStore(clean_redis, KG, journal_maxlen=50)
    epochs = store.claim(range(KG))
    engine = ShardEngine(config)
    for b in range(400):
        run_batch(engine, store, epochs, [ev(b, "u1")])
    assert clean_redis.xlen(store.journal_key(key_group("c1\x00u1", KG))) < 250  # "~": whole radix nodes


def test_actions_and_failed_runs_land_in_their_streams(clean_redis: Any, config: Config) -> None:
    store = RedisStore(clean_redis, KG)
    epochs = store.claim(range(KG))
    out = run_batch(ShardEngine(config), store, epochs, [ev(1, "u1"), ev(2, "u1"), ev(3, "u2", boom=True)])
    lottery = [json.loads(f[b"action"]) for _, f in clean_redis.xrange(LOTTERY)]
    assert lottery == [a for a in out.actions if a["type"] == "lottery.grant_chance"]
    assert len(lottery) == 1
    kg1, kg2 = key_group("c1\x00u1", KG), key_group("c1\x00u2", KG)
    outbox = [json.loads(f[b"action"]) for _, f in clean_redis.xrange(store.outbox_key(kg1))]
    assert [a["id"] for a in outbox] == [a["id"] for a in out.actions if a["type"] == "wallet.grant_cash"]
    assert len(outbox) == 2
    (_, failed), = clean_redis.xrange(store.failed_key(kg2))
    entry = json.loads(failed[b"entry"])
    assert entry["event"]["id"] == "e3" and entry["rule"] == "quiz" and "boom" in entry["error"]


def test_a_resent_commit_writes_nothing_twice(clean_redis: Any, config: Config) -> None:
    store = RedisStore(clean_redis, KG)
    epochs = store.claim(range(KG))
    engine = ShardEngine(config)
    out = engine.process([ev(i, f"u{i}") for i in range(10)], TS)
    snaps = engine.snapshot()
    args = (epochs, snaps, out.journal, out.actions, out.failed, TARGETS, WEBHOOKS)
    store.commit(*args, batch_id="b-1")
    store.commit(*args, batch_id="b-1")  # e.g. a retry after a connection error
    assert clean_redis.xlen(LOTTERY) == 10
    assert sum(clean_redis.xlen(store.outbox_key(k)) for k in range(KG)) == 10
    assert clean_redis.xlen(store.journal_key(key_group("c1\x00u0", KG))) == 1


@pytest.mark.parametrize("per_group_calls", [False, True])
def test_commit_is_one_round_trip(clean_redis: Any, config: Config, per_group_calls: bool) -> None:
    """One round trip either way: one script call in all (single Redis) or one per key group (Cluster)."""
    store = RedisStore(clean_redis, KG, per_group_calls=per_group_calls)
    epochs = store.claim(range(KG))
    engine = ShardEngine(config)
    run_batch(engine, store, epochs, [ev(0, "warmup")])  # loads the script once
    events = [ev(i, f"u{i % 50}") for i in range(1, 201)]
    for k, b in store.load(engine.missing(events)).items():
        engine.restore(k, b)
    out = engine.process(events, TS)
    snaps = engine.snapshot()
    groups = {key_group(k, KG) for k in snaps}
    before_trips, before = store.round_trips, clean_redis.info("commandstats")
    store.commit(epochs, snaps, out.journal, out.actions, out.failed, TARGETS, WEBHOOKS)
    after = clean_redis.info("commandstats")
    assert store.round_trips - before_trips == 1
    calls = after["cmdstat_evalsha"]["calls"] - before["cmdstat_evalsha"]["calls"]
    assert len(groups) > 1
    assert calls == (len(groups) if per_group_calls else 1)
    assert "cmdstat_script|exists" not in after and "cmdstat_multi" not in after


def test_commit_survives_a_script_flush(clean_redis: Any, config: Config) -> None:
    store = RedisStore(clean_redis, KG)
    epochs = store.claim(range(KG))
    engine = ShardEngine(config)
    run_batch(engine, store, epochs, [ev(1, "u1")])
    clean_redis.script_flush()  # what a restarted Redis looks like to a long-lived store
    run_batch(engine, store, epochs, [ev(2, "u1")])
    assert len(store.journal("c1\x00u1")) == 2


def test_commit_refuses_unclaimed_groups_and_unknown_targets(clean_redis: Any, config: Config) -> None:
    store = RedisStore(clean_redis, KG)
    engine = ShardEngine(config)
    out = engine.process([ev(1, "u1")], TS)
    snaps = engine.snapshot()
    with pytest.raises(ValueError, match="not claimed"):
        store.commit({}, snaps, out.journal, out.actions, out.failed, TARGETS, WEBHOOKS)
    with pytest.raises(ValueError, match="no target for gameplay 'wallet'"):
        store.commit(store.claim(range(KG)), snaps, out.journal, out.actions, out.failed, TARGETS, set())
    assert clean_redis.hlen(store.users_key(key_group("c1\x00u1", KG))) == 0


def commit_some(server: RedisServer, config: Config) -> tuple[dict[str, bytes], dict[int, int]]:
    client = server.client()
    store = RedisStore(client, KG)
    epochs = store.claim(range(KG))
    engine = ShardEngine(config)
    run_batch(engine, store, epochs, [ev(i, f"u{i % 7}") for i in range(30)])
    snaps = store.load([f"c1\x00u{i}" for i in range(7)])
    client.close()
    assert all(snaps.values())
    return snaps, epochs


def test_committed_data_survives_a_redis_restart(tmp_path: Path, config: Config) -> None:
    with RedisServer(tmp_path) as server:
        snaps, epochs = commit_some(server, config)
        server.restart()
        client = server.client()
        store = RedisStore(client, KG)
        assert store.load(snaps) == snaps
        assert client.xlen(LOTTERY) == 7
        assert {kg: store.epoch(kg) for kg in epochs} == epochs
        client.close()


def test_the_journal_is_read_back_page_by_page_until_the_limit_or_the_scan_depth(
        clean_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from playbus.actors.store import commit

    store = RedisStore(clean_redis, 1)  # one group: every batch in one journal stream
    epochs = store.claim([0])
    for b in range(450):  # 450 batches: u1 has a decision in every 10th, u2 in every one
        journal = [{"campaign": "c1", "user": "u2", "event": f"x{b}", "ts": TS}]
        if b % 10 == 0:
            journal.append({"campaign": "c1", "user": "u1", "event": f"e{b}", "ts": TS})
        store.commit(epochs, {}, journal)
    trips = store.round_trips
    found = store.journals(["c1\x00u1", "c1\x00u2"])  # no limit: every page of the scan depth
    assert [e["event"] for e in found["c1\x00u1"]] == [f"e{b}" for b in range(0, 450, 10)]  # oldest first
    assert len(found["c1\x00u2"]) == 450
    assert store.round_trips - trips == 3  # pages of 200: the first of every group pipelined, then 2 more
    trips = store.round_trips
    assert [e["event"] for e in store.journal("c1\x00u2", 5)] == [f"x{b}" for b in range(449, 444, -1)]
    assert store.round_trips - trips == 1  # the limit was found in the first page
    monkeypatch.setattr(commit, "JOURNAL_SCAN", 200)  # the scan depth caps how far back a lookup reads
    assert [e["event"] for e in store.journal("c1\x00u1", 100)][-1] == "e250"


def test_large_commits_are_written_whole(clean_redis: Any) -> None:
    store = RedisStore(clean_redis, 1)  # one group: everything in one script call
    epochs = store.claim([0])
    snaps = {f"c1\x00u{i}": f"snap{i}".encode() for i in range(2500)}
    journal = [{"campaign": "c1", "user": "u0", "event": f"e{i}", "ts": TS} for i in range(2100)]
    store.commit(epochs, snaps, journal)
    assert dict(store.scan_users(0)) == snaps
    entries = store.journal("c1\x00u0", 5000)
    assert len(entries) == 2100 and entries[0]["event"] == "e2099" and entries[-1]["event"] == "e0"


@pytest.mark.parametrize("per_group_calls", [False, True])
def test_a_key_of_the_wrong_type_fails_its_group_before_any_write_and_a_retry_lands_once_fixed(
        clean_redis: Any, config: Config, per_group_calls: bool) -> None:
    store = RedisStore(clean_redis, KG, per_group_calls=per_group_calls)
    epochs = store.claim(range(KG))
    user = users_in_group(4, 1)[0]
    other = users_in_group(6, 1)[0]
    clean_redis.set(LOTTERY, "not a stream")  # the lottery target stream key holds a string
    engine = ShardEngine(config)
    out = engine.process([ev(1, user), ev(2, other)], TS)
    snaps = engine.snapshot()
    with pytest.raises(StoreError, match=r"key 'playbus:actions:lottery' holds a string"):
        store.commit(epochs, snaps, out.journal, out.actions, out.failed, TARGETS, WEBHOOKS, batch_id="b1")
    # Nothing of either group was written: no snapshot, no journal, no outbox, and no batch token.
    for u, kg in ((user, 4), (other, 6)):
        assert store.snapshot_of(f"c1\x00{u}") is None
        assert clean_redis.exists(store.journal_key(kg), store.outbox_key(kg), f"playbus:{{kg{kg}}}:batch") == 0
    clean_redis.delete(LOTTERY)  # an operator fixes the key; the retry of the same commit lands, once
    store.commit(epochs, snaps, out.journal, out.actions, out.failed, TARGETS, WEBHOOKS, batch_id="b1")
    assert clean_redis.xlen(LOTTERY) == 2
    store.commit(epochs, snaps, out.journal, out.actions, out.failed, TARGETS, WEBHOOKS, batch_id="b1")
    assert clean_redis.xlen(LOTTERY) == 2


def test_a_journal_or_users_key_of_the_wrong_type_is_refused_too(clean_redis: Any, config: Config) -> None:
    store = RedisStore(clean_redis, KG)
    epochs = store.claim(range(KG))
    user = users_in_group(1, 1)[0]
    engine = ShardEngine(config)
    out = engine.process([ev(1, user)], TS)
    clean_redis.set(store.users_key(1), "x")
    with pytest.raises(StoreError, match=r"holds a string"):
        store.commit(epochs, engine.snapshot([f"c1\x00{user}"]), out.journal, out.actions, out.failed, TARGETS,
                     WEBHOOKS)
    assert not clean_redis.exists(LOTTERY)
    clean_redis.delete(store.users_key(1))
    clean_redis.hset(store.journal_key(1), "a", "b")
    with pytest.raises(StoreError, match=r"holds a hash"):
        store.commit(epochs, engine.snapshot([f"c1\x00{user}"]), out.journal, out.actions, out.failed, TARGETS,
                     WEBHOOKS)
    assert store.snapshot_of(f"c1\x00{user}") is None and not clean_redis.exists(LOTTERY)
