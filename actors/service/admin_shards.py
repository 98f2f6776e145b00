"""The shard endpoints of the admin API: the shard map, and a rescale asked for.

    GET  /v1/shards               {"count", "target", "generation", "shards": [{"shard", "groups"}], "last"}
    POST /v1/shards {"count": N}  202: the cluster's supervisor moves whole key groups until N shards own them
                                  (service/rescale.py); done when /healthz lists N shards
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from playbus.actors.service.replies import Response, error, reply
from playbus.actors.store.audit import AuditLog
from playbus.actors.store.shardmap import ShardLayout, ShardMap, ShardMapError

__all__ = ["ShardAdmin", "describe"]


def describe(layout: ShardLayout) -> dict[str, Any]:
    """The map as the API answers it: groups per shard rather than the owner of each of them."""
    counts = [0] * layout.shards
    for s in layout.owners:
        counts[s] += 1
    return {"count": layout.count, "target": layout.target, "generation": layout.generation,
            "rescaling": layout.target != layout.count,
            "shards": [{"shard": i, "groups": n} for i, n in enumerate(counts)], "last": layout.last}


class ShardAdmin:
    def __init__(self, shard_map: ShardMap, audit: AuditLog) -> None:
        self.map = shard_map
        self.audit = audit

    async def handle(self, method: str, path: str, who: str, body: bytes) -> Response:
        if path != "/v1/shards":
            return error(404, f"no such endpoint: {method} {path}")
        if method == "GET":
            layout = await asyncio.to_thread(self.map.read)
            if layout is None:
                return error(404, "no shard map: the cluster has not started on this Redis")
            return reply(200, describe(layout))
        if method != "POST":
            return error(405, "use GET or POST")
        try:
            req = json.loads(body or b"null")
        except ValueError as e:
            return error(400, f"body is not valid JSON: {e}")
        if not isinstance(req, dict) or set(req) != {"count"}:
            return reply(400, {"error": 'expected {"count": N}', "field": "count"})
        count = req["count"]
        if type(count) is not int:
            return reply(422, {"error": f"count: expected an integer, got {type(count).__name__}", "field": "count"})
        try:
            layout = await asyncio.to_thread(self.map.request, count)
        except ShardMapError as e:
            return reply(422, {"error": str(e), "field": "count"})
        self.audit.record(who, "shards.scale", str(count), {"from": layout.count})
        return reply(202, {**describe(layout), "message": f"rescaling from {layout.count} to {count} shards: done "
                                                           f"when /healthz lists {count} (GET /v1/shards)"})
