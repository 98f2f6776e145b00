"""ScriptCatalog: every version of every script and the active one, in Redis, shared by all shards.

    playbus:{catalog}:scripts          set     script names
    playbus:{catalog}:script:<name>    hash    "v:<N>" -> source, "next" -> last version number, "active" -> N,
                                               "file" -> the source last loaded from the script's file,
                                               "canary" -> N and "canary_percent" -> P while a canary runs
    playbus:{catalog}:generation       string  bumped by every change: shards reload the catalog when it moves
The hash tag keeps every catalog key in one Redis Cluster slot, so each change is one atomic script.

A rule's script file is deployed at every start (`deploy`): the first time, its source is version 1; later, a
file whose source differs from the one last loaded from it becomes a new version and is activated, and an
unchanged file leaves active whatever operators activated since.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis

from playbus.actors.store.scripts import lua

if TYPE_CHECKING:
    from playbus.actors.engine.engine import ShardEngine

__all__ = ["GENERATION", "ScriptCatalog"]

NAMES = "playbus:{catalog}:scripts"
GENERATION = "playbus:{catalog}:generation"
LEGACY_NAMES = "playbus:scripts"  # where playbus 0.1 kept script names (see migrate_legacy)


def _key(name: str) -> str:
    return f"playbus:{{catalog}}:script:{name}"


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _script(name: str, raw: dict[Any, Any]) -> dict[str, Any]:
    """{"name", "active", "versions": {N: source}, "canary": {"version", "percent"} or None} of a script hash."""
    fields = {_text(k): v for k, v in raw.items()}
    versions = {int(k[2:]): _text(v) for k, v in fields.items() if k.startswith("v:")}
    canary = None
    if "canary" in fields:
        canary = {"version": int(fields["canary"]), "percent": float(fields.get("canary_percent", 100))}
    return {"name": name, "active": int(fields.get("active", 0)), "versions": dict(sorted(versions.items())),
            "canary": canary}


class ScriptCatalog:
    """Script versions in Redis; version numbers are allocated atomically."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._deploy = client.register_script(lua("catalog_deploy"))
        self._add = client.register_script(lua("catalog_add"))
        self._activate = client.register_script(lua("catalog_activate"))

    def migrate_legacy(self) -> list[str]:
        """Copy scripts stored under the keys of playbus 0.1 (`playbus:scripts`, `playbus:script:<name>`) to
        the catalog's keys, once: the names copied."""
        copied = []
        legacy: Any = self.client.smembers(LEGACY_NAMES)
        for raw in legacy:
            name = _text(raw)
            if self.client.exists(_key(name)):
                continue
            fields: Any = self.client.hgetall(f"playbus:script:{name}")
            if fields:
                self.client.hset(_key(name), mapping=fields)
                self.client.sadd(NAMES, name)
                copied.append(name)
        if copied:
            self.client.incr(GENERATION)
        return copied

    def deploy(self, name: str, source: str) -> tuple[bool, int]:
        """Load a script file: (whether it became a new active version, the active version)."""
        changed, active = self._deploy(keys=[NAMES, _key(name), GENERATION], args=[name, source])
        return bool(int(changed)), int(active)

    def add(self, name: str, source: str) -> int:
        """Store a new version (active if it is the first); returns its number."""
        return int(self._add(keys=[NAMES, _key(name), GENERATION], args=[name, source]))

    def activate(self, name: str, version: int, percent: float = 100) -> bool:
        """Make `version` the active one (percent 100, which ends a canary), or the canary run by `percent`% of
        the users; False if the script has no such version."""
        return bool(int(self._activate(keys=[_key(name), GENERATION], args=[version, percent])))

    def generation(self) -> int:
        """A number that changes whenever the catalog does."""
        return int(self.client.get(GENERATION) or 0)

    def get(self, name: str) -> dict[str, Any] | None:
        """{"name", "active", "versions": {N: source}} or None when unknown."""
        raw: Any = self.client.hgetall(_key(name))
        if not raw:
            return None
        return _script(name, raw)

    def names(self) -> list[str]:
        raw: Any = self.client.smembers(NAMES)
        return sorted(_text(n) for n in raw)

    def all(self) -> list[dict[str, Any]]:
        names = self.names()
        pipe = self.client.pipeline(transaction=False)
        for n in names:
            pipe.hgetall(_key(n))
        return [_script(n, raw) for n, raw in zip(names, pipe.execute(), strict=True) if raw]

    def active_sources(self) -> dict[str, str]:
        """name -> the source of its active version, for every script with one."""
        return {s["name"]: s["versions"][s["active"]] for s in self.all() if s["active"]}

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
            if s["canary"] is not None and s["canary"]["version"] in versions:
                engine.activate(name, s["canary"]["version"], s["canary"]["percent"])
