"""Redis clients from the URL playbus is given: one Redis server, or a Redis Cluster.

    redis://host:port[/db], rediss://..., unix://...    one server (redis.Redis.from_url)
    redis+cluster://host:port[,host:port...][/0]         a Redis Cluster (rediss+cluster:// with TLS): any nodes of
                                                         it, the client learns the others and the slots from them

The cluster clients are redis-py's, with one change: a command answered TRYAGAIN (a multi-key command, such as a
commit unit's script, whose slot is being migrated and whose keys are split between the two nodes for a moment)
is sent again with a short backoff until TRYAGAIN_S has passed, instead of redis-py's 0.4 s. TRYAGAIN means the
command was not run, so sending it again is safe for any command. MOVED and ASK are redis-py's to follow.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as _AsyncRedisCluster
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as _RedisCluster
from redis.exceptions import ClusterError, TryAgainError

__all__ = ["CLUSTER_SCHEMES", "TRYAGAIN_S", "AsyncClusterClient", "ClusterClient", "connect", "connect_async",
           "is_cluster", "is_cluster_client"]

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
TRYAGAIN_S = 10.0  # how long a command answered TRYAGAIN (a slot in migration) is sent again
# ClusterError: redis-py's "TTL exhausted" after its own retries of TRYAGAIN/MOVED/ASK; ClusterDownError (a
# subclass) while the cluster re-forms. Neither ran the command.
RETRY_ERRORS = (TryAgainError, ClusterError)


def is_cluster(url: str) -> bool:
    """Whether `url` names a Redis Cluster (redis+cluster:// or rediss+cluster://)."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def is_cluster_client(client: Any) -> bool:
    """Whether `client` (or pipeline) is a redis-py Redis Cluster client, sync or asyncio."""
    return isinstance(client, (_RedisCluster, _AsyncRedisCluster))


def _split(url: str) -> tuple[str, list[tuple[str, int]]]:
    """(a redis:// URL of the first node, every node given) of a cluster URL."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES[parts.scheme.lower()]
    auth, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for h in hosts.split(","):
        host, _, port = h.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"redis cluster URL {url!r}: expected host:port[,host:port...], got {h!r}")
        nodes.append((host.strip("[]"), int(port)))
    first = f"{auth}@{hosts.split(',')[0]}" if auth else hosts.split(",")[0]
    return urlunsplit((scheme, first, parts.path, parts.query, parts.fragment)), nodes


class ClusterClient(_RedisCluster):
    """redis.cluster.RedisCluster that sends a command answered TRYAGAIN again for up to TRYAGAIN_S."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        deadline = 0.0
        delay = 0.01
        while True:
            try:
                return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
            except RETRY_ERRORS:
                now = time.monotonic()
                deadline = deadline or now + TRYAGAIN_S
                if now >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)


class AsyncClusterClient(_AsyncRedisCluster):
    """redis.asyncio.cluster.RedisCluster that sends a command answered TRYAGAIN again for up to TRYAGAIN_S."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        deadline = 0.0
        delay = 0.01
        while True:
            try:
                return await super().execute_command(*args, **kwargs)
            except RETRY_ERRORS:
                now = time.monotonic()
                deadline = deadline or now + TRYAGAIN_S
                if now >= deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)


def connect(url: str, **kwargs: Any) -> Any:
    """A sync client of `url`: redis.Redis for one server, ClusterClient for redis+cluster:// (kwargs: the
    connection settings, e.g. socket_timeout)."""
    if not is_cluster(url):
        return redis.Redis.from_url(url, **kwargs)
    first, nodes = _split(url)
    startup = [ClusterNode(h, p) for h, p in nodes[1:]]  # type: ignore[no-untyped-call]
    return ClusterClient.from_url(first, startup_nodes=startup, **kwargs)


def connect_async(url: str, **kwargs: Any) -> Any:
    """An asyncio client of `url`: redis.asyncio.Redis, or AsyncClusterClient for redis+cluster://."""
    if not is_cluster(url):
        return aioredis.Redis.from_url(url, **kwargs)
    first, nodes = _split(url)
    return AsyncClusterClient.from_url(first, startup_nodes=[AsyncClusterNode(h, p) for h, p in nodes[1:]],
                                       **kwargs)
