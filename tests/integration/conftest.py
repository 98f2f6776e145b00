"""Integration fixtures: a real redis-server started by the tests on a free port (never fakeredis)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from playbus.actors.store.server import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server (AOF on) for the test module, data in a temp dir."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_client(redis_server: RedisServer) -> Iterator[Any]:
    """A bytes-speaking redis-py client of the module's server."""
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def clean_redis(redis_client: Any) -> Any:
    """The module's client on an emptied server, for tests that count what they find."""
    redis_client.flushall()
    return redis_client
