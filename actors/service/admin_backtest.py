"""BacktestAdmin: `POST /v1/scripts/{name}/backtest`, a script's active version against a candidate on recorded or
given events, with no side effect anywhere (plain Python).

    {"candidate": {"source": "..."} | {"version": N},
     "events": [...] | "recorded": {"last": N, "campaign": id (optional)}}

Recorded events are the campaign's last N from the key groups' journals (store.recorded; every campaign whose
rules run the script unless "campaign" names one). Both versions start from the same states, read (never
written) from the users' committed snapshots: for recorded events rewound to before the first of them (the keys
their runs wrote set back to the values the journal shows before, their grants taken out of the cap counters),
for given events as they are now. Everything is read only (HGETALL, HMGET, XREVRANGE), nothing is written, not
even to the audit log: a backtest changes nothing. The run itself (store.recorded, engine.backtest) is off the
event loop, one backtest at a time per replica.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from playbus.actors.engine.backtest import backtest
from playbus.actors.engine.engine import user_keys
from playbus.actors.service.replies import MAX_BODY, MAX_EVENTS, Response, error, reply
from playbus.actors.store.catalog import ScriptCatalog
from playbus.actors.store.commit import RedisStore
from playbus.actors.store.recorded import read_recorded, starting_states
from playbus.config.schema import Config
from playbus.scripting.errors import ScriptCompileError, ScriptError

__all__ = ["MAX_RECORDED", "BacktestAdmin"]

log = logging.getLogger("playbus.admin")
MAX_RECORDED = 100_000  # recorded events one backtest may ask for
MAX_SOURCE = 256 * 1024  # = admin.MAX_SCRIPT
LOAD_CHUNK = 10_000  # user snapshots read per round trip
_SHAPE = ('body must be {"candidate": {"source": "..."} or {"version": N}, "events": [...] or '
          '"recorded": {"last": N}}')


class _Refused(Exception):
    """A request that cannot run: its HTTP status and message."""

    def __init__(self, status: int, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra or {}


class BacktestAdmin:
    """The backtest endpoint of one ingress replica; `running()` returns the configuration the shards run."""

    def __init__(self, config: Config, client: redis.Redis, catalog: ScriptCatalog,
                 running: Callable[[], Config]) -> None:
        self.config = config
        self.client = client
        self.catalog = catalog
        self.running = running
        self._lock = asyncio.Lock()

    async def backtest(self, name: str, body: bytes, who: str) -> Response:
        """Validate, then run the backtest off the event loop; `who` is only logged (nothing is audited: a
        backtest changes nothing)."""
        try:
            plan = self._plan(name, body)
        except _Refused as e:
            return reply(e.status, {"error": e.message, **e.extra})
        if self._lock.locked():
            return error(429, "a backtest is already running on this replica; retry once it is done",
                         {"retry-after": "5"})
        async with self._lock:
            log.info("backtest of script %s by %s: %s", name, who, plan["what"])
            try:
                doc = await asyncio.to_thread(self._run, plan)
            except _Refused as e:
                return reply(e.status, {"error": e.message, **e.extra})
        return reply(200, doc)

    def _plan(self, name: str, body: bytes) -> dict[str, Any]:
        """The request checked: what to run, or _Refused (400, 404, 413, 422)."""
        if len(body) > MAX_BODY:
            raise _Refused(413, f"request body of {len(body)} bytes exceeds {MAX_BODY}")
        try:
            req = json.loads(body or b"null")
        except ValueError as e:  # JSONDecodeError or UnicodeDecodeError
            raise _Refused(400, f"body is not valid JSON: {getattr(e, 'msg', e)}") from None
        if not isinstance(req, dict):
            raise _Refused(400, _SHAPE)
        cand = req.get("candidate")
        if not isinstance(cand, dict) or ("source" in cand) == ("version" in cand):
            raise _Refused(400, 'candidate: expected {"source": "..."} or {"version": N} (one of them)')
        if ("events" in req) == ("recorded" in req):
            raise _Refused(400, 'give either "events": [...] or "recorded": {"last": N}')
        script = self.catalog.get(name)
        if script is None:
            raise _Refused(404, f"no script named {name!r}")
        if not script["active"]:
            raise _Refused(422, f"script {name!r} has no active version to compare with")
        if "source" in cand:
            source = cand["source"]
            if not isinstance(source, str):
                raise _Refused(400, "candidate.source must be a string (the script's Lua source)")
            if len(source.encode()) > MAX_SOURCE:
                raise _Refused(413, f"candidate.source larger than {MAX_SOURCE} bytes")
            version = 0  # an unsaved source runs as version 0, as in a dry run
        else:
            version = cand["version"]
            if type(version) is not int or version not in script["versions"]:
                raise _Refused(422, f"candidate.version: script {name!r} has no version {version!r} "
                                    f"(versions: {sorted(script['versions'])})")
            source = script["versions"][version]
        config = self.running()
        campaigns = [c.id for c in config.campaigns if any(r.script_name == name for r in c.rules)]
        if not campaigns:
            raise _Refused(422, f"no running campaign has a rule running script {name!r}: nothing to compare")
        plan: dict[str, Any] = {"name": name, "source": source, "version": version, "config": config,
                                "listing": self.catalog.all()}
        if "events" in req:
            events = req["events"]
            if not isinstance(events, list):
                raise _Refused(400, "events must be an array of event objects")
            if len(events) > MAX_EVENTS:
                raise _Refused(413, f"{len(events)} events; at most {MAX_EVENTS} (or \"recorded\": "
                                    f"{{\"last\": N}} for up to {MAX_RECORDED})")
            if not events:
                raise _Refused(422, "events: give at least one event")
            plan.update(events=events, what=f"{len(events)} given events")
            return plan
        rec = req["recorded"]
        if not isinstance(rec, dict):
            raise _Refused(400, 'recorded must be an object: {"last": N}')
        last, campaign = rec.get("last"), rec.get("campaign")
        if type(last) is not int or last < 1:
            raise _Refused(422, f"recorded.last: expected a positive integer, got {last!r}")
        if last > MAX_RECORDED:
            raise _Refused(413, f"recorded.last: at most {MAX_RECORDED} events, got {last}")
        if campaign is not None:
            if campaign not in campaigns:
                raise _Refused(422, f"recorded.campaign: {campaign!r} is not a running campaign with a rule running "
                                    f"script {name!r} (those: {', '.join(campaigns)})")
            campaigns = [campaign]
        plan.update(last=last, campaigns=campaigns, what=f"the last {last} recorded events of {', '.join(campaigns)}")
        return plan

    def _run(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Read the events and the starting states, then backtest (on a worker thread; reads only). The cyclic
        garbage collector is paused meanwhile (it would walk the many objects of 100,000 events over and over)."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._read_and_run(plan)
        finally:
            if collecting:
                gc.enable()

    def _read_and_run(self, plan: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        config: Config = plan["config"]
        rec = None
        if "events" in plan:
            events: list[Any] = plan["events"]
        else:
            rec = read_recorded(self.client, config.key_groups, plan["campaigns"], plan["last"])
            events = list(rec.events)
            if not events:
                raise _Refused(422, f"the journals hold no recorded event of {', '.join(plan['campaigns'])} "
                                    f"(events are recorded from this version on)")
        store = RedisStore(self.client, config.key_groups)
        keys = list(dict.fromkeys(user_keys(events)))
        snapshots: dict[str, bytes | None] = {}
        for i in range(0, len(keys), LOAD_CHUNK):
            snapshots.update(store.load(keys[i:i + LOAD_CHUNK]))
        contexts, caps, unreadable = starting_states(rec, snapshots, config)
        try:
            doc = backtest(config, plan["name"], plan["source"], plan["version"], plan["listing"], events,
                           contexts, caps=caps)
        except ScriptCompileError as e:
            raise _Refused(422, f"candidate: {e}", {"line": e.line}) from None
        except ScriptError as e:
            raise _Refused(422, str(e)) from None
        start: dict[str, Any] = {"users": len(keys), "committed": sum(1 for b in snapshots.values() if b is not None),
                                 "unreadable": unreadable}
        if rec is not None:
            doc["recorded"] = {"last": plan["last"], "found": len(events), "campaigns": plan["campaigns"],
                               "journal_entries": rec.entries}
            start.update(rewound=len(rec.written), assumed_absent=rec.assumed, complete=rec.complete)
        doc["starting_states"] = start
        doc["decide_seconds"] = doc["seconds"]  # the two runs; "seconds": all of it, reads included
        doc["seconds"] = round(time.perf_counter() - started, 3)
        return doc
