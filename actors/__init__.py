"""playbus.actors: the shards and what surrounds them, in four layers that import only downwards.

    edge     the only modules that import Ray: the actors, the Serve app, the cluster start-up
    service  plain-Python compositions the actors wrap: shard core, micro-batcher, router, HTTP API, admin
    store    Redis: the commit unit, budget leases, script catalog, outboxes, input streams
    engine   the pure decision core: engine, events, user state, caps, clock, budgets, decisions, keys

This folder is the package `playbus.actors` (see playbus/actors); import it by that name.
"""

from __future__ import annotations

if not __name__.startswith("playbus."):
    raise ImportError(f"import playbus.{__name__}, not {__name__}: this folder is a subpackage of playbus")

__all__: list[str] = []
