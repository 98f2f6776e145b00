"""Redis: the fenced commit unit, budget leases, the script catalog, and the embedded redis-server."""

from __future__ import annotations

from playbus.actors.store.catalog import ScriptCatalog
from playbus.actors.store.commit import RedisStore
from playbus.actors.store.errors import FencedError, RedisServerError, StoreError
from playbus.actors.store.leases import LeasedBudgets
from playbus.actors.store.server import RedisServer

__all__ = ["FencedError", "LeasedBudgets", "RedisServer", "RedisServerError", "RedisStore", "ScriptCatalog",
           "StoreError"]
