"""AdminApi: the admin endpoints of the HTTP API (scripts: push, list, show, activate, dry-run), plain Python.

Only with `Authorization: Bearer <PLAYBUS_ADMIN_TOKEN>`; every endpoint refuses when the variable is unset.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgpack

from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.local import LocalRun
from playbus.actors.service.replies import MAX_EVENTS, Response, error, reply
from playbus.actors.store.catalog import ScriptCatalog
from playbus.config.schema import Config
from playbus.scripting.errors import ScriptCompileError
from playbus.scripting.sandbox import Sandbox

MAX_MADE = 10_000  # events a dry run's rules may make (sends, timers fired) before it is refused

__all__ = ["MAX_SCRIPT", "AdminApi"]

MAX_SCRIPT = 256 * 1024
ShardCall = Callable[[int, str, Sequence[Any]], Awaitable[Any]]
_SCRIPT = re.compile(r"^/v1/scripts/([A-Za-z0-9_][A-Za-z0-9_\-]*)(?:/(activate|dry-run))?$")


class AdminApi:
    """The admin endpoints of one ingress replica; `call_shard(i, method, args)` reaches shard i."""

    def __init__(self, config: Config, catalog: ScriptCatalog, call_shard: ShardCall) -> None:
        self.config = config
        self.catalog = catalog
        self.call_shard = call_shard
        self.checker = Sandbox(config.sandbox.max_instructions, config.sandbox.max_memory_kb)  # compiles pushes

    def check(self, headers: dict[str, str]) -> Response | None:
        """None when the request carries the admin token, else the 401 to answer."""
        token = os.environ.get("PLAYBUS_ADMIN_TOKEN")
        given = headers.get("authorization", "")
        if not token:
            return error(401, "admin endpoints are disabled: PLAYBUS_ADMIN_TOKEN is not set")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return error(401, "missing or wrong admin token", {"www-authenticate": "Bearer"})
        return None

    async def scripts(self, method: str, path: str, body: bytes) -> Response:
        """/v1/scripts and /v1/scripts/{name}[/activate|/dry-run]."""
        if path == "/v1/scripts":
            if method != "GET":
                return error(405, "use GET")
            return reply(200, {"scripts": [{"name": s["name"], "active": s["active"],
                                            "versions": sorted(s["versions"])} for s in self.catalog.all()]})
        m = _SCRIPT.match(path)
        if not m:
            return error(404, f"no such endpoint: {method} {path}")
        name, op = m.group(1), m.group(2)
        if op is None and method == "PUT":
            return await self.put_script(name, body)
        if op is None and method == "GET":
            s = self.catalog.get(name)
            if s is None:
                return error(404, f"no script named {name!r}")
            return reply(200, {"name": name, "active": s["active"], "versions": sorted(s["versions"]),
                               "source": s["versions"].get(s["active"], "")})
        if op == "activate" and method == "POST":
            return await self.activate(name, body)
        if op == "dry-run" and method == "POST":
            return self.dry_run(name, body)
        return error(405, f"{method} is not allowed on {path}")

    async def put_script(self, name: str, body: bytes) -> Response:
        if len(body) > MAX_SCRIPT:
            return error(413, f"script larger than {MAX_SCRIPT} bytes")
        try:
            source = body.decode("utf-8")
        except UnicodeDecodeError:
            return error(400, "script source must be UTF-8 text")
        try:
            h = self.checker.compile(name, source)
            self.checker.drop_script(h)
        except ScriptCompileError as e:
            return reply(422, {"error": str(e), "line": e.line})
        version = self.catalog.add(name, source)
        await asyncio.gather(*(self.call_shard(s, "put_script", (name, source, version))
                               for s in range(self.config.shards)))
        return reply(201, {"name": name, "version": version})

    async def activate(self, name: str, body: bytes) -> Response:
        try:
            version = json.loads(body or b"{}").get("version")
        except (ValueError, AttributeError):  # JSONDecodeError, UnicodeDecodeError, or not an object
            return error(400, 'body must be JSON like {"version": 2}')
        s = self.catalog.get(name)
        if s is None:
            return error(404, f"no script named {name!r}")
        if type(version) is not int or version not in s["versions"]:
            return error(422, f"script {name!r} has no version {version!r} (versions: {sorted(s['versions'])})")
        self.catalog.activate(name, version)
        await asyncio.gather(*(self.call_shard(s2, "activate", (name, version)) for s2 in range(self.config.shards)))
        return reply(200, {"name": name, "active": version})

    def dry_run(self, name: str, body: bytes) -> Response:
        """Run events through the engine with the given script version and context: no side effect anywhere."""
        try:
            req = json.loads(body)
        except ValueError as e:  # JSONDecodeError or UnicodeDecodeError
            return error(400, f"body is not valid JSON: {getattr(e, 'msg', e)}")
        if not isinstance(req, dict) or not isinstance(req.get("events"), list):
            return error(400, 'body must be {"events": [...], "source" | "version": ..., "context": {...}}')
        events, context = req["events"], req.get("context") or {}
        if len(events) > MAX_EVENTS:
            return error(413, f"at most {MAX_EVENTS} events")
        if not isinstance(context, dict):
            return error(400, "context must be an object")
        try:
            context_blob = msgpack.packb(context)
        except (OverflowError, ValueError, TypeError) as e:
            return error(400, f"context cannot be encoded ({e}): integers must fit in 64 bits")
        s = self.catalog.get(name)
        if "source" in req:
            if not isinstance(req["source"], str):
                return error(400, "source must be a string")
            source, v = req["source"], 0  # an unsaved source runs as version 0
        elif s is None:
            return error(404, f"no script named {name!r}")
        else:
            v = req.get("version", s["active"])
            if type(v) is not int or v not in s["versions"]:
                return error(422, f"script {name!r} has no version {v!r}")
            source = s["versions"][v]
        # A private sandbox and in-memory budgets: nothing leaves it. Every script as the shards run it, and
        # this one at the version asked (or the source given, as version 0).
        stored = [{**x, "versions": {x["active"]: x["versions"][x["active"]]}} for x in self.catalog.all()
                  if x["name"] != name and x["active"]]
        stored.append({"name": name, "active": v, "versions": {v: source}})
        engine = ShardEngine(self.config, scripts=stored)
        # Sends are decided in-process right after the event that made them, timers fire by the events' clock
        # and at the end (the last event's time plus the longest timer): they are listed under "made".
        run = LocalRun(engine, int(time.time() * 1000), context_blob if context else None, max_steps=MAX_MADE)
        results: list[dict[str, Any]] = []
        made: list[dict[str, Any]] = []
        try:
            for raw in events:
                for step in run.event(raw):
                    (made if step.via else results).append(step.line() if step.via else step.result)
            made += [step.line() for step in run.finish()]
        except RuntimeError as e:  # rules fanning out past MAX_MADE events
            return error(422, str(e))
        return reply(200, {"results": results, "made": made})
