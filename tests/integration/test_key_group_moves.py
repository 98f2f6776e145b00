"""Key groups moving between shards (a rescale), on a real Redis without Ray: a shard takes its groups from the
shard map, a released group's users leave memory, the new owner's claim fences the old one, and context and dedup
ids follow their group through the snapshots, there and back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from playbus.actors.engine.keys import contiguous_owners, key_group, user_key
from playbus.actors.service.shard import ShardCore
from playbus.actors.store.errors import FencedError
from playbus.actors.store.server import RedisServer
from playbus.actors.store.shardmap import ShardMap, ShardMapError
from playbus.config.schema import Config
from tests.support.configs import T0, quiz_config

KG = 16


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return quiz_config(tmp_path_factory.mktemp("cfg"), shards=2, key_groups=KG)


def quiz(eid: str, user: str) -> dict[str, Any]:
    return {"id": eid, "campaign": "c1", "user": user, "type": "quiz.answered", "ts": T0}


def user_in(groups: set[int], prefix: str = "u") -> str:
    return next(f"{prefix}{i}" for i in range(10_000) if key_group(user_key("c1", f"{prefix}{i}"), KG) in groups)


def test_the_map_starts_from_the_config_and_a_shard_takes_what_it_gives(config: Config, redis_server: RedisServer,
                                                                      clean_redis: Any) -> None:
    smap = ShardMap(clean_redis, KG)
    assert smap.read() is None
    with pytest.raises(ShardMapError, match="not started"):
        smap.request(3)
    start = smap.start(2)
    assert (start.owners, start.count, start.target) == (contiguous_owners(2, KG), 2, 2)
    assert ShardCore(config, 1, redis_server.url).groups == set(range(8, 16))
    smap.move_all(contiguous_owners(4, KG))
    assert ShardCore(config, 3, redis_server.url).groups == {12, 13, 14, 15}  # index beyond the config's shards
    assert ShardCore(config, 1, redis_server.url).groups == {4, 5, 6, 7}
    with pytest.raises(ShardMapError, match=r"count: must be 1\.\.16"):
        smap.request(17)
    assert smap.request(4).target == 4
    layout = smap.read()
    assert layout is not None and (layout.count, layout.target) == (2, 4)  # asked for, not done
    smap.finish(4, {"from": 2, "to": 4})
    layout = smap.read()
    assert layout is not None and (layout.count, layout.last) == (4, {"from": 2, "to": 4})
    clean_redis.hset("playbus:{meta}:shards", "owners", b"\xc1")
    with pytest.raises(ShardMapError, match="cannot be read"):
        smap.read()


def test_context_and_dedup_follow_a_group_there_and_back_and_the_old_owner_is_fenced(
        config: Config, redis_server: RedisServer, clean_redis: Any, tmp_path: Path) -> None:
    ShardMap(clean_redis, KG).start(2)
    a = ShardCore(config, 0, redis_server.url)
    b = ShardCore(config, 1, redis_server.url)
    g = min(a.groups)
    user = user_in({g})
    assert [r["status"] for r in a.process([quiz("e1", user), quiz("e2", user)])] == ["applied", "applied"]
    assert user_key("c1", user) in a.engine.users

    # Without a release, the new owner's claim fences the old one: its next commit of the group writes nothing.
    b.acquire([g])
    assert g in b.groups
    with pytest.raises(FencedError):
        a.process([quiz("e3", user)])
    assert b.process([quiz("e2", user), quiz("e3", user)])[0]["status"] == "duplicate"  # dedup came along
    assert b.context("c1", user) == {"quiz.answered": 3}

    # Handed back the proper way: the releasing owner drops the users; the taker forgets what it held before.
    assert b.release([g]) == 1 and g not in b.groups and user_key("c1", user) not in b.engine.users
    a.release([g])  # it had lost the group to the claim; memory still held the user's stale state
    assert user_key("c1", user) not in a.engine.users
    a.acquire([g])
    assert [r["status"] for r in a.process([quiz("e3", user), quiz("e4", user)])] == ["duplicate", "applied"]
    assert a.context("c1", user) == {"quiz.answered": 4}
    assert a.acquire([g]) == {}  # idempotent


def test_acquiring_drops_stale_memory_of_an_earlier_ownership(config: Config, redis_server: RedisServer,
                                                             clean_redis: Any) -> None:
    ShardMap(clean_redis, KG).start(2)
    a = ShardCore(config, 0, redis_server.url)
    b = ShardCore(config, 1, redis_server.url)
    g = min(a.groups)
    user = user_in({g}, "s")
    a.process([quiz("s1", user)])
    # The group goes to b (a's memory is not dropped here, as if a's release had been skipped), b decides more
    # events, then the group comes back to a: a must not decide from what it held before.
    a.groups = a.groups - {g}
    b.acquire([g])
    b.process([quiz("s2", user), quiz("s3", user)])
    b.release([g])
    a.acquire([g])
    assert a.process([quiz("s4", user)])[0]["status"] == "applied"
    assert a.context("c1", user) == {"quiz.answered": 4}
