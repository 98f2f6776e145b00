"""IngressCore: the HTTP API of CONTRACT.md as plain async Python over bytes (Serve wraps it in serve_app.py).

It parses, routes events to shards by key group, calls the shards concurrently and answers in request
order. It never answers 500 for bad input: 400 (unparseable), 413 (too large), 503 (overloaded), 401 (admin).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote

import msgpack
import redis

from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.keys import user_key
from playbus.actors.engine.state import decode_snapshot
from playbus.actors.service.router import Router
from playbus.actors.store.catalog import ScriptCatalog
from playbus.actors.store.commit import RedisStore
from playbus.config.schema import Config
from playbus.scripting.errors import ScriptCompileError, ScriptError
from playbus.scripting.sandbox import Sandbox

__all__ = ["MAX_BODY", "MAX_EVENTS", "IngressCore", "Response"]

log = logging.getLogger("playbus.ingress")

MAX_EVENTS = 1000
MAX_BODY = 20 * 1024 * 1024  # 1000 events of up to 16 KiB data each, plus envelopes
MAX_SCRIPT = 256 * 1024
Response = tuple[int, dict[str, str], bytes]
ShardCall = Callable[[int, str, Sequence[Any]], Awaitable[Any]]

_JSON = {"content-type": "application/json"}
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode
_CTX = re.compile(r"^/v1/campaigns/([^/]+)/users/([^/]+)/(context|decisions)$")
_SCRIPT = re.compile(r"^/v1/scripts/([A-Za-z0-9_][A-Za-z0-9_\-]*)(?:/(activate|dry-run))?$")


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    h = dict(_JSON)
    if headers:
        h.update(headers)
    return status, h, _dumps(body).encode()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json(status, {"error": message}, headers)


class IngressCore:
    """One ingress replica's logic; `call_shard(i, method, args)` reaches shard i's actor."""

    def __init__(self, config: Config, call_shard: ShardCall, redis_url: str, max_inflight: int = 50_000) -> None:
        self.config = config
        self.call_shard = call_shard
        self.router = Router(config.shards, config.key_groups)
        self.client = redis.Redis.from_url(redis_url, socket_timeout=10)
        self.store = RedisStore(self.client, config.key_groups)
        self.catalog = ScriptCatalog(self.client)
        self.checker = Sandbox(config.sandbox.max_instructions, config.sandbox.max_memory_kb)
        self.max_inflight = max_inflight
        self.inflight = 0

    # -- dispatch ----------------------------------------------------------------------------------
    async def handle(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> Response:
        try:
            return await self._dispatch(method, path, query, headers, body)
        except ScriptError as e:
            return _error(422, str(e))
        except Exception as e:  # noqa: BLE001 - a server fault, never the client's input
            log.exception("ingress: %s %s failed", method, path)
            return _error(503, f"temporarily unavailable: {type(e).__name__}: {e}", {"retry-after": "1"})

    async def _dispatch(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> Response:
        if path == "/v1/events":
            if method != "POST":
                return _error(405, "use POST")
            return await self.post_events(headers, body)
        if path == "/healthz":
            return await self.healthz()
        m = _CTX.match(path)
        if m and method == "GET":
            campaign, user = unquote(m.group(1)), unquote(m.group(2))
            if m.group(3) == "context":
                return self.get_context(campaign, user)
            return self.get_decisions(campaign, user, query)
        if path == "/v1/scripts" or path.startswith("/v1/scripts/"):
            denied = self._check_admin(headers)
            if denied:
                return denied
            return await self.scripts(method, path, body)
        return _error(404, f"no such endpoint: {method} {path}")

    # -- events ------------------------------------------------------------------------------------
    def parse_events(self, headers: dict[str, str], body: bytes) -> list[Any] | Response:
        if len(body) > MAX_BODY:
            return _error(413, f"request body of {len(body)} bytes exceeds {MAX_BODY}")
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        try:
            if ctype in ("application/msgpack", "application/x-msgpack"):
                doc = msgpack.unpackb(body, raw=False, strict_map_key=False)
            else:
                doc = json.loads(body)
        except Exception as e:  # noqa: BLE001 - any decoding failure is a 400
            return _error(400, f"body is not valid {'msgpack' if 'msgpack' in ctype else 'JSON'}: {e}")
        events = doc if isinstance(doc, list) else [doc]
        if len(events) > MAX_EVENTS:
            return _error(413, f"{len(events)} events in one request; at most {MAX_EVENTS}")
        return events

    async def post_events(self, headers: dict[str, str], body: bytes) -> Response:
        parsed = self.parse_events(headers, body)
        if isinstance(parsed, tuple):
            return parsed
        events = parsed
        if not events:
            return _json(200, {"results": []})
        if self.inflight + len(events) > self.max_inflight:
            return _error(503, "overloaded: too many events in flight", {"retry-after": "1"})
        self.inflight += len(events)
        try:
            results = await self.process(events)
        finally:
            self.inflight -= len(events)
        return _json(200, {"results": results})

    async def process(self, events: list[Any]) -> list[dict[str, Any]]:
        """Route to shards, call them concurrently, gather results in request order."""
        return await self.router.dispatch(events, self.call_shard)

    # -- reads -------------------------------------------------------------------------------------
    def get_context(self, campaign: str, user: str) -> Response:
        blob = self.store.snapshot_of(user_key(campaign, user))
        ctx: dict[str, Any] = {}
        if blob is not None:
            _, raw = decode_snapshot(blob)
            if raw:
                ctx = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        return _json(200, {"campaign": campaign, "user": user, "context": ctx})

    def get_decisions(self, campaign: str, user: str, query: str) -> Response:
        q = parse_qs(query)
        try:
            limit = int(q.get("limit", ["20"])[0])
        except ValueError:
            return _error(400, "limit must be an integer")
        limit = max(0, min(limit, self.store.journal_limit))
        entries = self.store.journal(user_key(campaign, user), limit)
        keep = ("event", "ts", "rule", "script_version", "actions", "changes", "error", "refused")
        return _json(200, {"decisions": [{k: e.get(k) for k in keep} for e in entries]})

    async def healthz(self) -> Response:
        try:
            replies = await asyncio.wait_for(
                asyncio.gather(*(self.call_shard(s, "health", ()) for s in range(self.config.shards))), timeout=5)
        except Exception as e:  # noqa: BLE001 - any shard not answering means unhealthy
            return _json(503, {"ok": False, "error": f"{type(e).__name__}: {e}"}, {"retry-after": "1"})
        return _json(200, {"ok": True, "shards": replies})

    # -- admin -------------------------------------------------------------------------------------
    def _check_admin(self, headers: dict[str, str]) -> Response | None:
        token = os.environ.get("PLAYBUS_ADMIN_TOKEN")
        given = headers.get("authorization", "")
        if not token:
            return _error(401, "admin endpoints are disabled: PLAYBUS_ADMIN_TOKEN is not set")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "missing or wrong admin token", {"www-authenticate": "Bearer"})
        return None

    async def scripts(self, method: str, path: str, body: bytes) -> Response:
        if path == "/v1/scripts":
            if method != "GET":
                return _error(405, "use GET")
            return _json(200, {"scripts": [{"name": s["name"], "active": s["active"],
                                            "versions": sorted(s["versions"])} for s in self.catalog.all()]})
        m = _SCRIPT.match(path)
        if not m:
            return _error(404, f"no such endpoint: {method} {path}")
        name, op = m.group(1), m.group(2)
        if op is None and method == "PUT":
            return await self.put_script(name, body)
        if op is None and method == "GET":
            s = self.catalog.get(name)
            if s is None:
                return _error(404, f"no script named {name!r}")
            return _json(200, {"name": name, "active": s["active"], "versions": sorted(s["versions"]),
                               "source": s["versions"].get(s["active"], "")})
        if op == "activate" and method == "POST":
            return await self.activate(name, body)
        if op == "dry-run" and method == "POST":
            return self.dry_run(name, body)
        return _error(405, f"{method} is not allowed on {path}")

    async def put_script(self, name: str, body: bytes) -> Response:
        if len(body) > MAX_SCRIPT:
            return _error(413, f"script larger than {MAX_SCRIPT} bytes")
        try:
            source = body.decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, "script source must be UTF-8 text")
        try:
            h = self.checker.compile(name, source)
            self.checker.drop_script(h)
        except ScriptCompileError as e:
            return _json(422, {"error": str(e), "line": e.line})
        version = self.catalog.add(name, source)
        await asyncio.gather(*(self.call_shard(s, "put_script", (name, source, version))
                               for s in range(self.config.shards)))
        return _json(201, {"name": name, "version": version})

    async def activate(self, name: str, body: bytes) -> Response:
        try:
            version = json.loads(body or b"{}").get("version")
        except (ValueError, AttributeError):  # JSONDecodeError, UnicodeDecodeError, or not an object
            return _error(400, 'body must be JSON like {"version": 2}')
        s = self.catalog.get(name)
        if s is None:
            return _error(404, f"no script named {name!r}")
        if type(version) is not int or version not in s["versions"]:
            return _error(422, f"script {name!r} has no version {version!r} (versions: {sorted(s['versions'])})")
        self.catalog.activate(name, version)
        await asyncio.gather(*(self.call_shard(s2, "activate", (name, version)) for s2 in range(self.config.shards)))
        return _json(200, {"name": name, "active": version})

    def dry_run(self, name: str, body: bytes) -> Response:
        """Run events through the engine with the given script version and context: no side effect anywhere."""
        try:
            req = json.loads(body)
        except ValueError as e:  # JSONDecodeError or UnicodeDecodeError
            return _error(400, f"body is not valid JSON: {getattr(e, 'msg', e)}")
        if not isinstance(req, dict) or not isinstance(req.get("events"), list):
            return _error(400, 'body must be {"events": [...], "source" | "version": ..., "context": {...}}')
        events, context = req["events"], req.get("context") or {}
        if len(events) > MAX_EVENTS:
            return _error(413, f"at most {MAX_EVENTS} events")
        if not isinstance(context, dict):
            return _error(400, "context must be an object")
        try:
            context_blob = msgpack.packb(context)
        except (OverflowError, ValueError, TypeError) as e:
            return _error(400, f"context cannot be encoded ({e}): integers must fit in 64 bits")
        s = self.catalog.get(name)
        if "source" in req:
            if not isinstance(req["source"], str):
                return _error(400, "source must be a string")
            source, v = req["source"], 0  # an unsaved source runs as version 0
        elif s is None:
            return _error(404, f"no script named {name!r}")
        else:
            v = req.get("version", s["active"])
            if type(v) is not int or v not in s["versions"]:
                return _error(422, f"script {name!r} has no version {v!r}")
            source = s["versions"][v]
        engine = ShardEngine(self.config)  # private sandbox and in-memory budgets: nothing leaves it
        self.catalog.install(engine, all_versions=False, skip=name)
        engine.put_script(name, source, v)
        engine.activate(name, v)
        if context:
            engine.start_users(events, context_blob)
        out = engine.process(events, int(time.time() * 1000))
        return _json(200, {"results": out.results})
