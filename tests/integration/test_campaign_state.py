"""Operating a running campaign without Ray: the pause flag and budget top-ups live in Redis, shards apply them
between batches and at start (a restart keeps a campaign paused), and every commit counts the campaign's rule
runs, grants and refusals in its key group's stats (exactly once with the batch)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.engine.budgets import BudgetShortage
from playbus.actors.engine.keys import group_prefix
from playbus.actors.service.shard import ShardCore
from playbus.actors.store.campaigns import CampaignState
from playbus.actors.store.commit import stat_counts
from playbus.actors.store.server import RedisServer
from playbus.config.schema import Config
from tests.support.configs import make_config

GRANT = """
function decide(e, ctx)
  ctx:incr("n", 1)
  emit("lottery.grant_chance", {chances = 1})
  emit("wallet.grant_cash", {amount_cents = 100})
end
"""


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, {"grant": GRANT},
                       [{"id": "grant", "on": "quiz.answered", "script": "grant",
                         "emits": ["lottery.grant_chance", "wallet.grant_cash"]}],
                       campaign="c1", starts="2026-01-01T00:00:00+08:00", ends="2028-01-01T00:00:00+08:00",
                       caps=[{"id": "daily", "action": "lottery.grant_chance", "per_user": 2, "period": "day"}],
                       budgets=[{"name": "cash", "action": "wallet.grant_cash", "param": "amount_cents",
                                 "total": 250}],
                       shards=1, key_groups=4)


def ev(eid: str, user: str = "u1") -> dict[str, Any]:
    return {"id": eid, "campaign": "c1", "user": user, "type": "quiz.answered", "ts": int(time.time() * 1000)}


def process(core: ShardCore, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As the batcher does: a batch whose budget leases were short is decided again once they are refilled."""
    for _ in range(5):
        try:
            return core.process(events)
        except BudgetShortage as e:
            core.forget(core.keys_of(events))  # the decided batch is dropped, its users reloaded
            assert core.recover(e)
    raise AssertionError("the batch kept overdrawing its leases")


def stats(client: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for kg in range(4):
        for k, v in client.hgetall(group_prefix(kg) + "stats").items():
            out[k.decode()] = out.get(k.decode(), 0) + int(v)
    return out


def test_a_paused_campaign_runs_no_rule_stays_paused_across_a_restart_and_resumes(
        clean_redis: Any, config: Config, redis_server: RedisServer) -> None:
    core = ShardCore(config, 0, redis_server.url)
    state = CampaignState(clean_redis)
    assert state.set_paused("c1", True) and not state.set_paused("c1", True)
    assert core.reconcile()
    assert [r["actions"] for r in process(core, [ev("p1")])] == [[]]
    assert core.context("c1", "u1") == {}
    core.close()
    core = ShardCore(config, 0, redis_server.url)  # a restart: the state is read at start
    assert core.engine.campaigns["c1"].paused
    assert [r["actions"] for r in process(core, [ev("p2")])] == [[]]
    state.set_paused("c1", False)
    core.reconcile()
    [res] = process(core, [ev("p3")])
    assert [a["type"] for a in res["actions"]] == ["lottery.grant_chance", "wallet.grant_cash"]
    assert core.context("c1", "u1") == {"n": 1}


def test_commits_count_runs_grants_and_refusals_and_a_top_up_reaches_a_shard_that_found_the_budget_empty(
        clean_redis: Any, config: Config, redis_server: RedisServer) -> None:
    core = ShardCore(config, 0, redis_server.url)
    results = process(core, [ev(f"e{i}") for i in range(4)])  # cap 2 a day; cash 250: two grants of 100
    assert [len(r["actions"]) for r in results] == [2, 2, 0, 0]
    assert stats(clean_redis) == {"c1\x00runs\x00grant\x001": 4, "c1\x00grants\x00lottery.grant_chance": 2,
                                  "c1\x00grants\x00wallet.grant_cash": 2, "c1\x00refusals\x00cap:daily": 2,
                                  "c1\x00refusals\x00budget:cash": 2}
    state = CampaignState(clean_redis)
    assert state.budgets("c1", ["cash"]) == {"cash": (250, 250 - 200 - core.budgets.held("c1", "cash"))}
    assert state.top_up("c1", "cash", 1000) == 1250
    core.reconcile()  # forgets that the budget looked exhausted
    [res] = process(core, [ev("x1", "u2")])
    assert [a["type"] for a in res["actions"]] == ["lottery.grant_chance", "wallet.grant_cash"]


def test_stat_counts_key_refusals_by_what_refused() -> None:
    decisions = [
        {"campaign": "c", "user": "u", "event": "e", "rule": "r", "script_version": 2, "actions": [{"type": "a.b"}],
         "error": None, "refused": [{"reason": "cap:day:1: at most 1 a.b per user per day"},
                                    {"reason": "budget:cash: cannot cover amount=5"},
                                    {"reason": "timers: the user has 256 timers pending"}]},
        {"campaign": "c", "user": "u", "event": "e2", "rule": "r", "script_version": 2, "actions": [],
         "error": "boom", "refused": []},
    ]
    assert stat_counts(decisions) == {"c\x00runs\x00r\x002": 2, "c\x00errors\x00r\x002": 1, "c\x00grants\x00a.b": 1,
                                      "c\x00refusals\x00cap:day:1": 1, "c\x00refusals\x00budget:cash": 1,
                                      "c\x00refusals\x00timers": 1}


def test_a_campaign_put_while_running_reaches_the_shard_and_survives_a_restart_and_an_unchanged_file(
        clean_redis: Any, config: Config, redis_server: RedisServer, tmp_path: Path) -> None:
    from playbus.config.errors import ConfigError
    from playbus.config.loader import parse_campaign
    from playbus.config.schema import campaign_document

    core = ShardCore(config, 0, redis_server.url)
    state = CampaignState(clean_redis)
    doc = {"id": "c2", "timezone": "UTC", "starts": "2026-01-01T00:00:00+00:00", "ends": "2028-01-01T00:00:00+00:00",
           "rules": [{"id": "g2", "on": "quiz.answered", "script": "grant",
                      "emits": ["lottery.grant_chance", "wallet.grant_cash"]}],
           "caps": [{"id": "once", "action": "lottery.grant_chance", "per_user": 1, "period": "campaign"}],
           "budgets": [{"name": "cash2", "action": "wallet.grant_cash", "param": "amount_cents", "total": 1000}]}
    scripts = core.catalog.active_sources()
    assert state.put(campaign_document(parse_campaign(doc, config, scripts)))
    core.reconcile()
    e = {**ev("n1", "u9"), "campaign": "c2"}
    [res] = process(core, [e])
    assert [a["type"] for a in res["actions"]] == ["lottery.grant_chance", "wallet.grant_cash"]
    assert "c2" in core.campaign_ids  # the partition reader's set, updated in place
    # Replaced: no cap now; the user's cap counter (by id) is kept, the rule runs with the new settings.
    state.put(campaign_document(parse_campaign({**doc, "caps": []}, config, scripts)))
    core.reconcile()
    [res] = process(core, [{**ev("n2", "u9"), "campaign": "c2"}])
    assert [a["type"] for a in res["actions"]] == ["lottery.grant_chance", "wallet.grant_cash"]
    core.close()
    # A restart with the same file: the campaign created through the API runs, as replaced.
    core = ShardCore(config, 0, redis_server.url)
    assert core.engine.campaigns["c2"].config.caps == ()
    [res] = process(core, [{**ev("n3", "u9"), "campaign": "c2"}])
    assert len(res["actions"]) == 2
    # Bad documents name their field.
    for bad, field in (({**doc, "rules": [{**doc["rules"][0], "script": "nope"}]}, "rules[0].script"),
                       ({**doc, "caps": [{"action": "lottery.grant_chance", "per_user": -1, "period": "day"}]},
                        "caps[0].per_user"),
                       ({**doc, "rules": [{**doc["rules"][0], "emits": ["vault.open"]}]}, "rules[0].emits[0]"),
                       ({**doc, "colour": "red"}, "colour")):
        try:
            parse_campaign(bad, config, scripts)
        except ConfigError as err:
            assert err.path == field, (err.path, str(err))
        else:
            raise AssertionError(f"{field}: accepted")


def test_an_edited_file_campaign_replaces_the_running_one_and_an_unchanged_file_keeps_the_operators(
        clean_redis: Any, config: Config, redis_server: RedisServer) -> None:
    from playbus.config.loader import parse_campaign
    from playbus.config.schema import campaign_document

    core = ShardCore(config, 0, redis_server.url)
    state = CampaignState(clean_redis)
    file_doc = campaign_document(config.campaigns[0])
    # An operator lowers the cap through the API.
    changed = {**file_doc, "caps": [{**file_doc["caps"][0], "per_user": 1}]}
    state.put(campaign_document(parse_campaign(changed, config, core.catalog.active_sources())))
    core.close()
    core = ShardCore(config, 0, redis_server.url)  # the same file: the operator's change stays
    assert core.engine.campaigns["c1"].config.caps[0].per_user == 1
    core.close()
    edited = config.model_copy(update={"campaigns": (config.campaigns[0].model_copy(update={
        "caps": (config.campaigns[0].caps[0].model_copy(update={"per_user": 5}),)}),)})
    core = ShardCore(edited, 0, redis_server.url)  # the file was edited: a deploy
    assert core.engine.campaigns["c1"].config.caps[0].per_user == 5
    assert state.deploy_file({"c1": campaign_document(edited.campaigns[0])}) == []  # deployed once
