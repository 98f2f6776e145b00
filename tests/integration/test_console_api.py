"""What the operators' console reads beside the rest of the admin API, through IngressCore on a real Redis with real
ShardCores (no Ray): `GET /v1/campaigns` lists every running campaign with its state, and `GET /v1/scripts/{name}
?version=N` shows any stored version's source (the console's diff between two versions)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.service.http_api import IngressCore
from playbus.actors.service.shard import ShardCore
from playbus.actors.store.server import RedisServer
from tests.support.configs import FIRST_QUIZ, quiz_config

TOKEN = "console-api-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def ingress(tmp_path: Path, redis_server: RedisServer, clean_redis: Any,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[IngressCore]:
    monkeypatch.setenv("PLAYBUS_ADMIN_TOKEN", TOKEN)
    config = quiz_config(tmp_path, shards=1, key_groups=4)
    core = ShardCore(config, 0, redis_server.url)

    async def call(i: int, method: str, args: Any) -> Any:
        if method == "campaigns_changed":
            return core.reconcile()
        return getattr(core, method)(*args)

    yield IngressCore(config, call, redis_server.url)
    core.close()


def get(ingress: IngressCore, method: str, path: str, query: str = "", body: bytes = b"",
        headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, out = asyncio.run(ingress.handle(method, path, query, AUTH if headers is None else headers, body))
    return status, json.loads(out)


def test_the_campaigns_are_listed_with_their_state_and_only_with_the_token(ingress: IngressCore) -> None:
    status, doc = get(ingress, "GET", "/v1/campaigns")
    assert status == 200
    [c1] = doc["campaigns"]
    assert (c1["id"], c1["paused"], [r["id"] for r in c1["rules"]]) == ("c1", False, ["quiz"])
    assert c1 == {**get(ingress, "GET", "/v1/campaigns/c1")[1]}  # each as GET /v1/campaigns/{id} shows it
    assert get(ingress, "POST", "/v1/campaigns/c1/pause")[0] == 200
    assert get(ingress, "GET", "/v1/campaigns")[1]["campaigns"][0]["paused"] is True
    assert get(ingress, "GET", "/v1/campaigns", headers={})[0] == 401
    assert get(ingress, "PUT", "/v1/campaigns")[0] == 405


def test_a_created_campaign_is_listed_by_id(ingress: IngressCore) -> None:
    doc = {"starts": "2026-06-01T00:00:00+08:00", "ends": "2026-07-01T00:00:00+08:00",
           "rules": [{"id": "q", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]}]}
    assert get(ingress, "PUT", "/v1/campaigns/a0", body=json.dumps(doc).encode())[0] == 201
    assert [c["id"] for c in get(ingress, "GET", "/v1/campaigns")[1]["campaigns"]] == ["a0", "c1"]


def test_any_stored_version_of_a_script_can_be_read(ingress: IngressCore) -> None:
    v2 = FIRST_QUIZ.replace("n == 1", "n <= 2")
    assert get(ingress, "PUT", "/v1/scripts/quiz", body=v2.encode()) == (201, {"name": "quiz", "version": 2})
    status, doc = get(ingress, "GET", "/v1/scripts/quiz")
    assert status == 200 and (doc["active"], doc["versions"]) == (1, [1, 2]) and "version" not in doc
    assert "n == 1" in doc["source"]
    status, doc = get(ingress, "GET", "/v1/scripts/quiz", "version=2")
    assert status == 200 and (doc["active"], doc["version"]) == (1, 2) and doc["source"] == v2
    status, doc = get(ingress, "GET", "/v1/scripts/quiz", "version=9")
    assert status == 404 and doc["error"] == "script 'quiz' has no version 9 (versions: [1, 2])"
    for bad in ("x", "-1", "1.5", "²", "1" * 20):
        status, doc = get(ingress, "GET", "/v1/scripts/quiz", f"version={bad}")
        assert (status, doc.get("field")) == (400, "version"), bad
