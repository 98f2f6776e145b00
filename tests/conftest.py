"""Fixtures every test folder may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from playbus.actors.store.cluster_server import LocalRedisCluster


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A private Redis Cluster for the test module: three masters (AOF on) on free ports, torn down after."""
    rc = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), masters=3)
    rc.start()
    yield rc
    rc.cleanup()
