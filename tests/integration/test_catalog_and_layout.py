"""What a start finds in Redis and keeps: script files deployed as versions (an edit is a deploy, an unchanged
file leaves the operators' activation), the key-group layout fixed for the life of the data, and a Redis whose
settings playbus can rely on (no eviction; fsync as promised). Real redis-servers, no Ray."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.service.shard import ShardCore, deploy_scripts
from playbus.actors.store.catalog import ScriptCatalog
from playbus.actors.store.durability import RedisSettingsError, check_server
from playbus.actors.store.layout import LayoutError, check_layout
from playbus.actors.store.server import RedisServer
from playbus.config.loader import load_config
from tests.support.configs import FIRST_QUIZ, T0, ev, write_config

RULES = [{"id": "quiz", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]}]
TWO_CHANCES = FIRST_QUIZ.replace("chances = 1", "chances = 2")


def test_the_first_start_makes_the_file_version_1(clean_redis: Any, tmp_path: Path) -> None:
    catalog = ScriptCatalog(clean_redis)
    assert catalog.deploy("quiz", FIRST_QUIZ) == (True, 1)
    assert catalog.get("quiz") == {"name": "quiz", "active": 1, "versions": {1: FIRST_QUIZ}, "canary": None}
    assert catalog.deploy("quiz", FIRST_QUIZ) == (False, 1)  # a restart with the same file changes nothing


def test_an_edited_file_becomes_the_active_version_and_an_unchanged_one_keeps_the_operators_choice(
        clean_redis: Any) -> None:
    catalog = ScriptCatalog(clean_redis)
    catalog.deploy("quiz", FIRST_QUIZ)
    pushed = catalog.add("quiz", "function decide(e, ctx) end")  # an operator pushes v2 and activates it
    assert pushed == 2 and catalog.activate("quiz", 2)
    assert catalog.deploy("quiz", FIRST_QUIZ) == (False, 2)  # restart, file unchanged: v2 stays active
    assert catalog.deploy("quiz", TWO_CHANCES) == (True, 3)  # the file was edited: a deploy
    s = catalog.get("quiz")
    assert s is not None and s["active"] == 3 and s["versions"][3] == TWO_CHANCES
    assert catalog.deploy("quiz", TWO_CHANCES) == (False, 3)


def test_a_catalog_from_before_file_tracking_counts_version_1_as_the_file(clean_redis: Any) -> None:
    key = "playbus:{catalog}:script:quiz"
    clean_redis.hset(key, mapping={"v:1": FIRST_QUIZ, "v:2": "function decide(e, ctx) end", "next": 2, "active": 2})
    catalog = ScriptCatalog(clean_redis)
    assert catalog.deploy("quiz", FIRST_QUIZ) == (False, 2)


def test_concurrent_starts_deploy_an_edited_file_once(clean_redis: Any) -> None:
    ScriptCatalog(clean_redis).deploy("quiz", FIRST_QUIZ)
    results: list[tuple[bool, int]] = []
    go = threading.Barrier(6)

    def start() -> None:
        go.wait()
        results.append(ScriptCatalog(clean_redis).deploy("quiz", TWO_CHANCES))

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [(False, 2)] * 5 + [(True, 2)]


def test_activating_a_version_that_does_not_exist_changes_nothing(clean_redis: Any) -> None:
    catalog = ScriptCatalog(clean_redis)
    catalog.deploy("quiz", FIRST_QUIZ)
    before = catalog.generation()
    assert not catalog.activate("quiz", 7)
    assert catalog.generation() == before and catalog.get("quiz")["active"] == 1  # type: ignore[index]


def test_a_shard_started_on_an_edited_file_runs_the_new_version(redis_server: RedisServer, clean_redis: Any,
                                                                tmp_path: Path) -> None:
    path = write_config(tmp_path, {"quiz": FIRST_QUIZ}, RULES, shards=1, key_groups=8)
    first = ShardCore(load_config(path), 0, redis_server.url)
    assert first.process([ev(1, "a")], T0)[0]["actions"][0]["params"] == {"chances": 1}
    first.close()
    (tmp_path / "quiz.lua").write_text(TWO_CHANCES)  # the operator edits the rule file and restarts
    second = ShardCore(load_config(path), 0, redis_server.url)
    action = second.process([ev(2, "b")], T0)[0]["actions"][0]
    assert action["params"] == {"chances": 2} and action["script_version"] == 2
    second.close()


def test_a_shard_reconciles_an_activation_it_missed(redis_server: RedisServer, clean_redis: Any,
                                                    tmp_path: Path) -> None:
    core = ShardCore(load_config(write_config(tmp_path, {"quiz": FIRST_QUIZ}, RULES, shards=1, key_groups=8)), 0,
                     redis_server.url)
    catalog = ScriptCatalog(clean_redis)
    v = catalog.add("quiz", TWO_CHANCES)
    catalog.activate("quiz", v)  # nobody told the shard
    assert core.reconcile()
    assert core.process([ev(1, "a")], T0)[0]["actions"][0]["params"] == {"chances": 2}
    assert not core.reconcile()  # nothing new since
    core.close()


def test_deploy_scripts_deploys_each_file_once_and_reports_what_became_active(clean_redis: Any,
                                                                             tmp_path: Path) -> None:
    rules = [*RULES, {"id": "again", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]}]
    config = load_config(write_config(tmp_path, {"quiz": FIRST_QUIZ}, rules))
    catalog = ScriptCatalog(clean_redis)
    assert deploy_scripts(catalog, config) == [("quiz", 1)]
    assert deploy_scripts(catalog, config) == []


def test_a_changed_key_groups_is_refused_with_a_clear_message(clean_redis: Any) -> None:
    check_layout(clean_redis, 128)
    check_layout(clean_redis, 128)
    with pytest.raises(LayoutError, match=r"key_groups: the config says 64, but the data in this Redis was "
                                          r"written with 128"):
        check_layout(clean_redis, 64)


def test_a_shard_refuses_to_start_on_data_of_another_key_groups(redis_server: RedisServer, clean_redis: Any,
                                                               tmp_path: Path) -> None:
    check_layout(clean_redis, 16)
    config = load_config(write_config(tmp_path, {"quiz": FIRST_QUIZ}, RULES, shards=1, key_groups=8))
    with pytest.raises(LayoutError):
        ShardCore(config, 0, redis_server.url)


def test_a_managed_redis_that_hides_config_is_used_with_a_warning(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """ElastiCache, Memorystore and others refuse CONFIG: playbus starts and says what the settings must be."""
    server = RedisServer(tmp_path, extra_args=["--rename-command", "CONFIG", ""]).start()
    try:
        client = server.client()
        with pytest.raises(Exception, match="unknown command"):
            client.config_get("maxmemory-policy")
        assert check_server(client, "everysec") is False
        assert check_server(client, "always") is False  # Redis 7.0: no WAITAOF
        assert "maxmemory-policy noeviction, and appendonly yes with appendfsync always" in caplog.text
        client.close()
    finally:
        server.stop()


def test_a_redis_that_may_evict_keys_is_refused(clean_redis: Any) -> None:
    assert check_server(clean_redis) is False
    clean_redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(RedisSettingsError, match="maxmemory-policy is 'allkeys-lru'"):
            check_server(clean_redis)
    finally:
        clean_redis.config_set("maxmemory-policy", "noeviction")


def test_fsync_always_needs_waitaof_or_appendfsync_always(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "everysec", appendfsync="everysec") as lax:
        client = lax.client()
        if client.info("server")["redis_version"] >= "7.2":
            assert check_server(client, "always") is True  # WAITAOF after every commit
        else:
            with pytest.raises(RedisSettingsError, match="has no WAITAOF and runs with appendonly 'yes', "
                                                         "appendfsync 'everysec'"):
                check_server(client, "always")
        assert check_server(client, "everysec") is False
    with RedisServer(tmp_path / "always", appendfsync="always") as strict:
        assert check_server(strict.client(), "always") in (True, False)  # accepted either way
        assert strict.client().config_get("appendfsync")["appendfsync"] == "always"


def test_scripts_of_playbus_0_1_are_carried_over_once(clean_redis: Any) -> None:
    clean_redis.sadd("playbus:scripts", "quiz")
    clean_redis.hset("playbus:script:quiz", mapping={"v:1": FIRST_QUIZ, "v:2": TWO_CHANCES, "next": 2, "active": 2})
    catalog = ScriptCatalog(clean_redis)
    assert catalog.migrate_legacy() == ["quiz"] and catalog.migrate_legacy() == []
    assert catalog.get("quiz") == {"name": "quiz", "active": 2, "versions": {1: FIRST_QUIZ, 2: TWO_CHANCES},
                                     "canary": None}
    assert catalog.deploy("quiz", FIRST_QUIZ) == (False, 2)  # the operators' version 2 stays active


def test_a_restarted_shard_preloads_every_user_of_its_groups_with_their_context(
        redis_server: RedisServer, clean_redis: Any, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {"quiz": FIRST_QUIZ}, RULES, shards=1, key_groups=8))
    first = ShardCore(config, 0, redis_server.url)
    users = [f"p{i}" for i in range(25)]
    first.process([ev(f"{r}-{u}", u) for r in range(3) for u in users], T0)
    first.close()

    second = ShardCore(config, 0, redis_server.url)  # a restart: nothing in memory yet
    assert not second.engine.users
    assert second.preload() == 25
    assert {second.engine.context("c1", u)["quiz.answered"] for u in users} == {3}
    assert second.preload() == 0  # what is in memory is not loaded again
    [res] = second.process([ev("next", "p7")], T0)
    assert res["status"] == "applied" and res["actions"] == []  # the loaded counter goes on: no second grant
    assert second.engine.context("c1", "p7")["quiz.answered"] == 4
    [dup] = second.process([ev("1-p7", "p7")], T0)  # the dedup memory came back with the context
    assert dup["status"] == "duplicate"
    second.close()
