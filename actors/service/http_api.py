"""IngressCore: the HTTP API of CONTRACT.md as plain async Python over bytes (Serve wraps it in serve_app.py).

It parses, routes events to shards by key group, calls the shards concurrently and answers in request
order. It never answers 500 for bad input: 400 (unparseable), 413 (too large), 503 (overloaded), 401 (admin).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote

import msgpack

from playbus.actors.engine.events import decode_events, decode_json_events, from_gameplays
from playbus.actors.engine.keys import user_key
from playbus.actors.engine.state import decode_snapshot, pending_timers
from playbus.actors.service.admin import AdminApi
from playbus.actors.service.admin_campaigns import CampaignAdmin
from playbus.actors.service.admin_shards import ShardAdmin
from playbus.actors.service.api_docs import ApiDocs
from playbus.actors.service.console import Console
from playbus.actors.service.replies import MAX_BODY, MAX_EVENTS, Response, error, reply
from playbus.actors.service.router import Router
from playbus.actors.store.audit import AuditLog
from playbus.actors.store.catalog import ScriptCatalog
from playbus.actors.store.commit import RedisStore
from playbus.actors.store.connect import connect
from playbus.actors.store.shardmap import ShardMap
from playbus.config.schema import Config
from playbus.scripting.errors import ScriptError

__all__ = ["MAX_BODY", "MAX_EVENTS", "IngressCore", "Response"]

log = logging.getLogger("playbus.ingress")
HEALTH_TIMEOUT_S = 5.0
MAX_DECISIONS = 100  # the most decisions one GET returns

ShardCall = Callable[[int, str, Sequence[Any]], Awaitable[Any]]

_CTX = re.compile(r"^/v1/campaigns/([^/]+)/users/([^/]+)/(context|decisions)$")
# The admin endpoints' path prefixes (the token is checked first; /v1/campaigns/{c}/users/... is matched before).
_ADMIN = ("/v1/scripts", "/v1/audit", "/v1/campaigns/", "/v1/dead", "/v1/failed", "/v1/shards", "/v1/campaigns")
MAP_CHECK_S = 1.0  # how often an ingress looks for a new shard map (a shard's NotOwner makes it look at once)


class IngressCore:
    """One ingress replica's logic; `call_shard(i, method, args)` reaches shard i's actor."""

    def __init__(self, config: Config, call_shard: ShardCall, redis_url: str, max_inflight: int = 50_000,
                 components: Callable[[], Awaitable[dict[str, dict[str, Any]]]] | None = None,
                 on_map_change: Callable[[], None] | None = None) -> None:
        """`components`: the health of the background components (stream reader, delivery) for /healthz;
        `on_map_change()`: called when the shard map changed (shards may have been started or ended)."""
        self.on_map_change = on_map_change
        self.config = config
        self.components = components
        self.call_shard = call_shard
        self.router = Router(config.shards, config.key_groups, refresh=self.refresh_map)
        self.client = connect(redis_url, socket_timeout=10)
        self.store = RedisStore(self.client, config.key_groups)
        self.shard_map = ShardMap(self.client, config.key_groups)
        self.map_generation = -1
        self._map_checked = 0.0
        self._refreshing: asyncio.Future[None] | None = None
        self._read_map()
        audit = AuditLog(self.client)
        catalog = ScriptCatalog(self.client)
        self.admin = AdminApi(config, catalog, call_shard, audit, CampaignAdmin(config, self.client, call_shard, audit,
                                                                               catalog, self.router),
                              self.router, ShardAdmin(self.shard_map, audit))
        self.docs = ApiDocs(config.key_groups)  # /openapi.json and /docs, without a token
        self.console = Console()  # /ui/: the operators' page (its files; it works through the admin API)
        self.max_inflight = max_inflight
        self.inflight = 0

    # -- the shard map -------------------------------------------------------------------------------
    def _read_map(self) -> None:
        """Route by the shard map in Redis (a cluster's start writes it; without one, the config's layout)."""
        layout = self.shard_map.read()
        if layout is not None and layout.generation != self.map_generation:
            self.router.set_owners(layout.owners, layout.count)
            if self.map_generation >= 0 and self.on_map_change is not None:
                self.on_map_change()
            self.map_generation = layout.generation
        self._map_checked = time.monotonic()

    async def refresh_map(self) -> None:
        """Read the shard map again (a shard refused events: NotOwner); concurrent callers share one read."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(asyncio.to_thread(self._read_map))
        await asyncio.shield(self._refreshing)

    async def _look_at_map(self) -> None:
        """At most every MAP_CHECK_S: read the map if its generation moved (one small read)."""
        if time.monotonic() - self._map_checked < MAP_CHECK_S:
            return
        self._map_checked = time.monotonic()
        try:
            generation = await asyncio.to_thread(self.shard_map.generation)
            if generation != self.map_generation:
                await self.refresh_map()
        except Exception as e:  # noqa: BLE001 - routing goes on with the map it has; NotOwner corrects it
            log.warning("ingress: cannot read the shard map: %s", e)

    # -- dispatch ----------------------------------------------------------------------------------
    async def handle(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> Response:
        try:
            return await self._dispatch(method, path, query, headers, body)
        except ScriptError as e:
            return error(422, str(e))
        except RecursionError:  # a JSON body nested deeper than the parsers go ("[[[[..."): the client's input
            return error(400, "body is not valid JSON: nested too deeply")
        except Exception as e:  # noqa: BLE001 - a server fault, never the client's input
            log.exception("ingress: %s %s failed", method, path)
            return error(503, f"temporarily unavailable: {type(e).__name__}: {e}", {"retry-after": "1"})

    async def _dispatch(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> Response:
        if self.docs.serves(path):
            return self.docs.handle(method, path)
        if self.console.serves(path):
            return self.console.handle(method, path)
        await self._look_at_map()
        if path == "/v1/events":
            if method != "POST":
                return error(405, "use POST")
            return await self.post_events(headers, body)
        if path == "/healthz":
            return await self.healthz()
        m = _CTX.match(path)
        if m and method == "GET":
            campaign, user = unquote(m.group(1)), unquote(m.group(2))
            if m.group(3) == "context":
                return self.get_context(campaign, user)
            return self.get_decisions(campaign, user, query)
        if path.startswith(_ADMIN):
            who = self.admin.who(headers)
            if not isinstance(who, str):
                return who
            return await self.admin.handle(method, path, query, who, body)
        return error(404, f"no such endpoint: {method} {path}")

    # -- events ------------------------------------------------------------------------------------
    def parse_events(self, headers: dict[str, str], body: bytes) -> list[Any] | Response:
        if len(body) > MAX_BODY:
            return error(413, f"request body of {len(body)} bytes exceeds {MAX_BODY}")
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        msgpack_body = ctype in ("application/msgpack", "application/x-msgpack")
        try:
            events: list[Any] = from_gameplays(decode_events(body) if msgpack_body else decode_json_events(body))
        except Exception as e:  # noqa: BLE001 - any decoding failure is a 400
            return error(400, f"body is not valid {'msgpack' if msgpack_body else 'JSON'}: {e}")
        if len(events) > MAX_EVENTS:
            return error(413, f"{len(events)} events in one request; at most {MAX_EVENTS}")
        return events

    async def post_events(self, headers: dict[str, str], body: bytes) -> Response:
        parsed = self.parse_events(headers, body)
        if isinstance(parsed, tuple):
            return parsed
        events = parsed
        if not events:
            return reply(200, {"results": []})
        if self.inflight + len(events) > self.max_inflight:
            return error(503, "overloaded: too many events in flight", {"retry-after": "1"})
        self.inflight += len(events)
        try:
            results = await self.process(events)
        finally:
            self.inflight -= len(events)
        return reply(200, {"results": results})

    async def process(self, events: list[Any]) -> list[dict[str, Any]]:
        """Route to shards, call them concurrently, gather results in request order."""
        return await self.router.dispatch(events, self.call_shard)

    # -- reads -------------------------------------------------------------------------------------
    def get_context(self, campaign: str, user: str) -> Response:
        """The user's committed context, and the timers its rules set that have not fired yet (soonest first)."""
        blob = self.store.snapshot_of(user_key(campaign, user))
        ctx: dict[str, Any] = {}
        timers: list[dict[str, Any]] = []
        if blob is not None:
            state, raw = decode_snapshot(blob)
            if raw:
                ctx = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            timers = pending_timers(state)
        return reply(200, {"campaign": campaign, "user": user, "context": ctx, "timers": timers})

    def get_decisions(self, campaign: str, user: str, query: str) -> Response:
        q = parse_qs(query)
        try:
            limit = int(q.get("limit", ["20"])[0])
        except ValueError:
            return error(400, "limit must be an integer")
        limit = max(0, min(limit, MAX_DECISIONS))
        entries = self.store.journal(user_key(campaign, user), limit)
        keep = ("event", "ts", "rule", "script_version", "actions", "changes", "error", "refused", "effects")
        return reply(200, {"decisions": [{k: e.get(k) for k in keep} for e in entries]})

    async def healthz(self) -> Response:
        """200 when every shard answers and can commit and every background component runs; else 503, with
        the same shape: {"ok", "shards": [one entry per shard], "components": {name: {...}}}."""
        async def shard(i: int) -> dict[str, Any]:
            try:
                h: dict[str, Any] = await asyncio.wait_for(self.call_shard(i, "health", ()), HEALTH_TIMEOUT_S)
                return h
            except Exception as e:  # noqa: BLE001 - a shard that does not answer is unhealthy
                return {"shard": i, "ok": False, "problems": [f"no answer: {type(e).__name__}: {e}"[:300]]}

        try:  # the shards of the map as it is now: a rescale that just ended lists its new count at once
            await self.refresh_map()
        except Exception as e:  # noqa: BLE001 - Redis down: the shards say so too
            log.warning("healthz: cannot read the shard map: %s", e)
        shards = await asyncio.gather(*(shard(i) for i in range(self.router.shards)))
        if not all(s.get("ok", False) for s in shards):
            # A rescale to fewer shards may have ended some of them meanwhile: report the shards of the map as it
            # is now (an ended shard is no longer part of the cluster, and its silence is not a fault).
            try:
                await self.refresh_map()
            except Exception as e:  # noqa: BLE001 - the map cannot be read (Redis down): the shards say so too
                log.warning("healthz: cannot read the shard map: %s", e)
            else:
                shards = shards[:self.router.shards]
        components = await self.components() if self.components is not None else {}
        ok = all(s.get("ok", False) for s in shards) and all(c.get("ok", False) for c in components.values())
        return reply(200 if ok else 503, {"ok": ok, "shards": shards, "components": components},
                     None if ok else {"retry-after": "1"})

