"""AdminApi: the admin endpoints of the HTTP API (scripts: push, list, show, activate, dry-run; the audit log),
plain Python.

Only with `Authorization: Bearer <token>`, where the token is `PLAYBUS_ADMIN_TOKEN` (whose label is "admin") or
one of `PLAYBUS_ADMIN_TOKENS` ("label:token,label:token", one per operator or tool); every endpoint refuses when
neither is set. Every change is written to the audit log with the label of the token that made it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

import msgpack

from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.local import LocalRun
from playbus.actors.engine.vectors import VectorError, load_vectors, vector_failures
from playbus.actors.service.admin_backtest import BacktestAdmin
from playbus.actors.service.admin_campaigns import CampaignAdmin
from playbus.actors.service.admin_dead import DeadLetterAdmin
from playbus.actors.service.admin_failed import FailedRunsAdmin
from playbus.actors.service.admin_shards import ShardAdmin
from playbus.actors.service.replies import MAX_EVENTS, Response, error, reply
from playbus.actors.service.router import Router
from playbus.actors.store.audit import AuditLog
from playbus.actors.store.catalog import ScriptCatalog
from playbus.actors.store.deadletters import DeadLetters
from playbus.config.schema import Config
from playbus.scripting.errors import ScriptCompileError
from playbus.scripting.sandbox import Sandbox

__all__ = ["MAX_SCRIPT", "AdminApi", "admin_tokens"]

log = logging.getLogger("playbus.admin")
MAX_SCRIPT = 256 * 1024
MAX_MADE = 10_000  # events a dry run's rules may make (sends, timers fired) before it is refused
_LABEL = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
ShardCall = Callable[[int, str, Sequence[Any]], Awaitable[Any]]
_SCRIPT = re.compile(r"^/v1/scripts/([A-Za-z0-9_][A-Za-z0-9_\-]*)(?:/(activate|dry-run|backtest))?$")


def admin_tokens(environ: Mapping[str, str]) -> dict[str, str]:
    """label -> token, from PLAYBUS_ADMIN_TOKEN (label "admin") and PLAYBUS_ADMIN_TOKENS ("label:token,...");
    ValueError naming the bad item."""
    tokens: dict[str, str] = {}
    single = environ.get("PLAYBUS_ADMIN_TOKEN")
    if single:
        tokens["admin"] = single
    for i, item in enumerate(x.strip() for x in environ.get("PLAYBUS_ADMIN_TOKENS", "").split(",")):
        if not item:
            continue
        label, sep, token = item.partition(":")
        if not sep or not _LABEL.match(label) or len(token) < 8:
            raise ValueError(f"PLAYBUS_ADMIN_TOKENS item {i + 1}: expected 'label:token' (label of letters, digits, "
                             f"'.', '_', '-'; token of at least 8 characters)")
        if label in tokens:
            raise ValueError(f"PLAYBUS_ADMIN_TOKENS item {i + 1}: label {label!r} is given twice")
        tokens[label] = token
    return tokens


class AdminApi:
    """The admin endpoints of one ingress replica; `call_shard(i, method, args)` reaches shard i."""

    def __init__(self, config: Config, catalog: ScriptCatalog, call_shard: ShardCall, audit: AuditLog,
                 campaigns: CampaignAdmin, router: Router | None = None, shards: ShardAdmin | None = None) -> None:
        """`router`: the shard layout the ingress routes by (broadcasts reach its shards); `shards`: the shard
        endpoints (none without a shard map)."""
        self.config = config
        self.router = router if router is not None else Router(config.shards, config.key_groups)
        self.shards = shards
        self.catalog = catalog
        self.call_shard = call_shard
        self.audit = audit
        self.campaigns = campaigns
        self.dead = DeadLetterAdmin(DeadLetters(audit.client), audit)
        self.failed = FailedRunsAdmin(config, audit.client, call_shard, audit, self._active_versions, self.router)
        self.backtests = BacktestAdmin(config, audit.client, catalog, campaigns.running)
        self.checker = Sandbox(config.sandbox.max_instructions, config.sandbox.max_memory_kb)  # compiles pushes
        # The scripts' test vectors (NAME.test.yaml beside the config's scripts): a push that fails them is refused.
        try:
            self.vectors: dict[str, Any] = load_vectors(config)
        except VectorError as e:
            log.error("admin: the test vectors cannot be read (%s); pushes of their scripts are refused", e)
            self.vectors = {}
            self.vector_error = str(e)
        else:
            self.vector_error = ""

    def _active_versions(self) -> dict[tuple[str, str], int]:
        """(campaign, rule) -> the active version of the script the rule runs, from one read of the catalog."""
        active = {s["name"]: int(s["active"]) for s in self.catalog.all()}
        return {(c.id, r.id): active.get(r.script_name, 0) for c in self.campaigns.running().campaigns
                for r in c.rules}

    def who(self, headers: dict[str, str]) -> str | Response:
        """The label of the admin token the request carries, else the 401 to answer."""
        try:
            tokens = admin_tokens(os.environ)
        except ValueError as e:
            return error(401, f"admin endpoints are disabled: {e}")
        if not tokens:
            return error(401, "admin endpoints are disabled: PLAYBUS_ADMIN_TOKEN is not set")
        given = headers.get("authorization", "").encode()
        found = None
        for label, token in tokens.items():  # every token compared, in constant time each
            if hmac.compare_digest(given, f"Bearer {token}".encode()):
                found = label
        if found is None:
            return error(401, "missing or wrong admin token", {"www-authenticate": "Bearer"})
        return found

    async def handle(self, method: str, path: str, query: str, who: str, body: bytes) -> Response:
        """Every admin endpoint, for the operator `who` (already authenticated)."""
        if path == "/v1/audit":
            if method != "GET":
                return error(405, "use GET")
            limit = _limit(query, 50, 1000)
            if isinstance(limit, tuple):
                return limit
            return reply(200, {"entries": self.audit.recent(limit)})
        if path == "/v1/scripts" or path.startswith("/v1/scripts/"):
            return await self.scripts(method, path, body, who, query)
        if path == "/v1/campaigns":
            if method != "GET":
                return error(405, "use GET (PUT /v1/campaigns/{id} creates one)")
            return reply(200, {"campaigns": await asyncio.to_thread(self.campaigns.listing)})
        if path.startswith("/v1/campaigns/"):
            return await self.campaigns.handle(method, path, query, who, body)
        if path == "/v1/dead" or path.startswith("/v1/dead/"):
            return await self.dead.handle(method, path, query, who, body)
        if path == "/v1/failed" or path.startswith("/v1/failed/"):
            return await self.failed.handle(method, path, query, who, body)
        if path == "/v1/shards" and self.shards is not None:
            return await self.shards.handle(method, path, who, body)
        return error(404, f"no such endpoint: {method} {path}")

    async def scripts(self, method: str, path: str, body: bytes, who: str, query: str = "") -> Response:
        """/v1/scripts and /v1/scripts/{name}[/activate|/dry-run|/backtest]; GET /v1/scripts/{name}?version=N shows
        that version's source (the console's diff between any two versions)."""
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
            return await self.put_script(name, body, who)
        if op is None and method == "GET":
            s = self.catalog.get(name)
            if s is None:
                return error(404, f"no script named {name!r}")
            shown = _version(query)
            if isinstance(shown, tuple):
                return shown
            if shown is not None and shown not in s["versions"]:
                return error(404, f"script {name!r} has no version {shown} (versions: {sorted(s['versions'])})")
            doc = {"name": name, "active": s["active"], "versions": sorted(s["versions"]),
                   "source": s["versions"].get(s["active"] if shown is None else shown, ""), "canary": s["canary"]}
            return reply(200, doc if shown is None else {**doc, "version": shown})
        if op == "activate" and method == "POST":
            return await self.activate(name, body, who)
        if op == "backtest" and method == "POST":
            return await self.backtests.backtest(name, body, who)
        if op == "dry-run" and method == "POST":
            return self.dry_run(name, body)
        return error(405, f"{method} is not allowed on {path}")

    async def put_script(self, name: str, body: bytes, who: str) -> Response:
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
        failures = await asyncio.to_thread(self._vector_failures, name, source)
        if failures:
            return reply(422, {"error": f"the script's test vectors fail ({len(failures)}); nothing was stored",
                               "failures": failures})
        version = self.catalog.add(name, source)
        self.audit.record(who, "script.push", name, {"version": version, "bytes": len(body)})
        await asyncio.gather(*(self.call_shard(s, "put_script", (name, source, version))
                               for s in range(self.router.shards)))
        return reply(201, {"name": name, "version": version})

    def _vector_failures(self, name: str, source: str) -> list[str]:
        """What the vectors of `name` say of `source`, run with the other scripts as the catalog has them."""
        if self.vector_error and name in {r.script_name for c in self.config.campaigns for r in c.rules}:
            return [self.vector_error]
        if name not in self.vectors:
            return []
        stored = [x for x in self.catalog.all() if x["name"] != name]
        return vector_failures(self.config, name, source, vectors=self.vectors, scripts=stored)

    async def activate(self, name: str, body: bytes, who: str) -> Response:
        """Make a version the active one, or with "percent" below 100 the canary of that share of the users
        (stable per user); activating the old version (or percent 100) is the rollback."""
        try:
            req = json.loads(body or b"{}")
            version, percent = req.get("version"), req.get("percent", 100)
        except (ValueError, AttributeError):  # JSONDecodeError, UnicodeDecodeError, or not an object
            return error(400, 'body must be JSON like {"version": 2} or {"version": 2, "percent": 10}')
        s = self.catalog.get(name)
        if s is None:
            return error(404, f"no script named {name!r}")
        if type(version) is not int or version not in s["versions"]:
            return error(422, f"script {name!r} has no version {version!r} (versions: {sorted(s['versions'])})")
        if type(percent) not in (int, float) or not 0 < percent <= 100:
            return error(422, f"percent: expected a number in (0, 100], got {percent!r}")
        previous = {"active": s["active"], "canary": s["canary"]}
        self.catalog.activate(name, version, percent)
        self.audit.record(who, "script.activate" if percent >= 100 else "script.canary", name,
                          {"version": version, "percent": percent, "previous": previous})
        await asyncio.gather(*(self.call_shard(s2, "activate", (name, version, percent))
                               for s2 in range(self.router.shards)))
        if percent >= 100:
            return reply(200, {"name": name, "active": version})
        return reply(200, {"name": name, "active": s["active"], "canary": {"version": version, "percent": percent}})

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
        engine = ShardEngine(self.campaigns.running(), scripts=stored)
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


def _version(query: str) -> int | None | Response:
    """The `version` query parameter of GET /v1/scripts/{name} (None when absent), or the 400 to answer."""
    raw = parse_qs(query).get("version", [None])[0]
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        return reply(400, {"error": f"version must be a positive integer, got {raw!r}", "field": "version"})
    return int(raw)


def _limit(query: str, default: int, most: int) -> int | Response:
    """The `limit` query parameter (1..most), or the 400 to answer."""
    raw = parse_qs(query).get("limit", [str(default)])[0]
    try:
        n = int(raw)
    except ValueError:
        return error(400, f"limit must be an integer, got {raw!r}")
    return max(0, min(n, most))
