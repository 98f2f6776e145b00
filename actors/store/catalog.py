"""ScriptCatalog: every version of every script and the active one, in Redis, shared by all shards.

    playbus:scripts                 set     script names
    playbus:script:<name>           hash    "v:<N>" -> source, "next" -> last version number, "active" -> N
A rule's script file seeds version 1 the first time the cluster starts; after that Redis is the truth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from playbus.actors.engine.engine import ShardEngine

__all__ = ["ScriptCatalog"]

NAMES = "playbus:scripts"


def _key(name: str) -> str:
    return f"playbus:script:{name}"


class ScriptCatalog:
    """Script versions in Redis; version numbers are allocated atomically (HINCRBY)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def seed(self, name: str, source: str) -> None:
        """Store `source` as version 1 unless the script exists already."""
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(NAMES, name)
        pipe.hsetnx(_key(name), "v:1", source)
        pipe.hsetnx(_key(name), "next", 1)
        pipe.hsetnx(_key(name), "active", 1)
        pipe.execute()

    def add(self, name: str, source: str) -> int:
        """Store a new version; returns its number."""
        v = int(self.client.hincrby(_key(name), "next", 1))
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(NAMES, name)
        pipe.hset(_key(name), f"v:{v}", source)
        pipe.hsetnx(_key(name), "active", v)
        pipe.execute()
        return v

    def activate(self, name: str, version: int) -> None:
        self.client.hset(_key(name), "active", version)

    def get(self, name: str) -> dict[str, Any] | None:
        """{"name", "active", "versions": {N: source}} or None when unknown."""
        raw: Any = self.client.hgetall(_key(name))
        if not raw:
            return None
        versions = {}
        active = 0
        for k, v in raw.items():
            k = k.decode() if isinstance(k, bytes) else k
            if k.startswith("v:"):
                versions[int(k[2:])] = v.decode() if isinstance(v, bytes) else v
            elif k == "active":
                active = int(v)
        return {"name": name, "active": active, "versions": dict(sorted(versions.items()))}

    def names(self) -> list[str]:
        raw: Any = self.client.smembers(NAMES)
        return sorted(n.decode() if isinstance(n, bytes) else n for n in raw)

    def all(self) -> list[dict[str, Any]]:
        out = []
        for n in self.names():
            s = self.get(n)
            if s is not None:
                out.append(s)
        return out

    def install(self, engine: ShardEngine, all_versions: bool = True, skip: str | None = None) -> None:
        """Give `engine` the stored scripts (every version, or only the active ones) and activate them."""
        for s in self.all():
            name, active = s["name"], s["active"]
            if name == skip:
                continue
            versions = s["versions"] if all_versions else {active: s["versions"][active]} if active else {}
            for v, source in versions.items():
                engine.put_script(name, source, v)
            if active:
                engine.activate(name, active)
