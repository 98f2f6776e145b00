"""What the Redis that playbus uses must be, checked at start: it must never evict keys, and, with
`durability: {fsync: always}`, `applied` must wait for the AOF fsync.

- Redis 7.2 and newer have WAITAOF: each commit is followed, in the same round trip, by `WAITAOF 1 0 <ms>`,
  which returns once the commit is fsynced to the local AOF.
- Redis 7.0 (this machine's) has no WAITAOF; there `appendonly yes` with `appendfsync always` gives the same
  guarantee (Redis fsyncs the AOF before it replies), and a server set otherwise is refused.
- A Redis Cluster: every primary is checked. WAITAOF is not used there (it must follow the commit on the same
  connection, and a commit is one call per group, on the groups' nodes): with `fsync: always` every primary must
  run `appendonly yes` and `appendfsync always`, whatever its version. (A replica promoted after a failover has
  what it had received: as with any Redis replication, the last writes before a primary's loss may be lost.)
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ResponseError

from playbus.actors.store.connect import is_cluster_client
from playbus.actors.store.errors import StoreError

__all__ = ["RedisSettingsError", "check_server", "server_version"]

log = logging.getLogger("playbus.store")


class RedisSettingsError(StoreError):
    """The Redis server's settings cannot give the guarantees playbus promises."""


def server_version(client: Any) -> tuple[int, ...]:
    info = client.info("server")
    return tuple(int(x) for x in str(info.get("redis_version", "0")).split(".")[:3] if x.isdigit())


def _config(client: Any, name: str) -> str | None:
    """A setting, or None when the server refuses CONFIG (managed services: ElastiCache, Memorystore, ...)."""
    try:
        got = client.config_get(name)
    except ResponseError as e:  # "unknown command" (renamed or disabled), NOPERM
        log.debug("CONFIG GET %s refused: %s", name, e)
        return None
    value = got.get(name, got.get(name.encode(), b"")) if isinstance(got, dict) else b""
    return value.decode() if isinstance(value, bytes) else str(value)


def check_server(client: Any, fsync: str = "everysec") -> bool:
    """Raise RedisSettingsError for a server playbus cannot rely on; True when commits must be followed by
    WAITAOF (fsync "always" on Redis 7.2+, one server). On a Redis Cluster, checks every primary (False)."""
    if is_cluster_client(client):
        for node in client.get_primaries():
            try:
                _check_node(client.get_redis_connection(node), fsync, cluster=True)
            except RedisSettingsError as e:
                raise RedisSettingsError(f"redis cluster node {node.name}: {e}") from None
        return False
    return _check_node(client, fsync, cluster=False)


def _check_node(client: Any, fsync: str, cluster: bool) -> bool:
    policy = _config(client, "maxmemory-policy")
    if policy is None:
        # A managed Redis that hides CONFIG: its settings are the provider's parameter group; say what they must be.
        log.warning("redis refuses CONFIG GET (a managed service?): its settings cannot be checked here. playbus "
                    "needs maxmemory-policy noeviction%s; set them in the service's parameters",
                    ", and appendonly yes with appendfsync always (durability.fsync: always)" if fsync == "always"
                    else "")
        return not cluster and fsync == "always" and server_version(client) >= (7, 2)
    if policy and policy != "noeviction":
        raise RedisSettingsError(
            f"redis: maxmemory-policy is {policy!r}, which lets Redis evict keys (a user's context, a dedup id, "
            f"an outbox entry); playbus needs 'noeviction' (CONFIG SET maxmemory-policy noeviction)")
    if fsync != "always":
        return False
    aof, every = _config(client, "appendonly"), _config(client, "appendfsync")
    if cluster and (aof != "yes" or every != "always"):
        raise RedisSettingsError(
            f"durability.fsync is 'always', but this node runs with appendonly {aof!r}, appendfsync {every!r}: on a "
            f"Redis Cluster every primary must run appendonly yes and appendfsync always (WAITAOF is not used there)")
    if cluster:
        return False
    if server_version(client) >= (7, 2):
        if aof != "yes":
            raise RedisSettingsError("durability.fsync is 'always', but this Redis runs with appendonly "
                                     f"{aof!r}: WAITAOF needs the AOF (CONFIG SET appendonly yes)")
        return True
    if aof != "yes" or every != "always":
        version = ".".join(map(str, server_version(client)))
        raise RedisSettingsError(
            f"durability.fsync is 'always', but this Redis {version} has no WAITAOF and runs with appendonly "
            f"{aof!r}, appendfsync {every!r}: set appendonly yes and appendfsync always, or use Redis 7.2+")
    return False
