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


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One local Ray session for the module (2 CPUs), unless one is running already."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, num_cpus=2, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def cluster(ray_session: None, config: Any, redis_server: RedisServer, clean_redis: Any) -> Iterator[Any]:
    """Fresh shard actors of the module's `config` on its emptied Redis, and an IngressCore in front of them."""
    from tests.integration.cluster_helpers import Cluster

    c = Cluster(config, redis_server.url)
    c.start()
    yield c
    c.stop()
