"""FailedRunsAdmin: failed rule runs and their replay (补单), over the admin API (plain Python).

    GET  /v1/failed?campaign=&rule=&limit=      the failed runs, newest first, with the error, event, rule, version
    POST /v1/failed/replay {"campaign", "rule"?} re-runs each of them once, on the active version, through the
                                                 user's shard (only the rule that failed; caps and budgets apply)
A replay is an event with a deterministic id ("r-..." of the entry and the version it is replayed on) that runs
one rule; when it succeeds, the commit that holds its effects also removes the entry: running replay twice, or
again after a crash half-way, grants nothing twice (the second finds no entry, or its id is a duplicate). A run
that fails again keeps its entry, and can be replayed again once another version is active.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from hashlib import blake2b
from typing import Any
from urllib.parse import parse_qs

import msgspec
import redis

from playbus.actors.engine.events import NO_DATA, Replay
from playbus.actors.service.replies import Response, error, reply
from playbus.actors.service.router import Router
from playbus.actors.store.audit import AuditLog
from playbus.actors.store.failed import FailedRuns
from playbus.config.schema import Config

__all__ = ["FailedRunsAdmin", "replay_id"]

ShardCall = Callable[[int, str, Sequence[Any]], Awaitable[Any]]
MAX_REPLAY = 10_000  # failed runs replayed by one call (call again for more)
CHUNK = 500


def replay_id(failed_id: str, version: int) -> str:
    """The id of the replay of a failed-runs entry on a script version: the same pair always yields the same id."""
    return "r-" + blake2b(f"{failed_id}/{version}".encode(), digest_size=12).hexdigest()


class FailedRunsAdmin:
    def __init__(self, config: Config, client: redis.Redis, call_shard: ShardCall, audit: AuditLog,
                 versions: Callable[[], dict[tuple[str, str], int]], router: Router | None = None) -> None:
        """`versions()`: (campaign, rule) -> the active version of the rule's script (a replay runs on it)."""
        self.config = config
        self.versions = versions
        self.failed = FailedRuns(client, config.key_groups)
        self.call_shard = call_shard
        self.audit = audit
        self.router = router if router is not None else Router(config.shards, config.key_groups)

    async def handle(self, method: str, path: str, query: str, who: str, body: bytes) -> Response:
        if path == "/v1/failed":
            if method != "GET":
                return error(405, "use GET")
            q = parse_qs(query)
            try:
                limit = max(0, min(int(q.get("limit", ["50"])[0]), 1000))
            except ValueError:
                return error(400, "limit must be an integer")
            campaign, rule = q.get("campaign", [None])[0], q.get("rule", [None])[0]
            runs = await asyncio.to_thread(self.failed.list, campaign, rule, limit)
            return reply(200, {"failed": runs})
        if path == "/v1/failed/replay":
            if method != "POST":
                return error(405, "use POST")
            return await self.replay(body, who)
        return error(404, f"no such endpoint: {method} {path}")

    async def replay(self, body: bytes, who: str) -> Response:
        try:
            req = json.loads(body or b"null")
        except ValueError as e:
            return error(400, f"body is not valid JSON: {getattr(e, 'msg', e)}")
        if not isinstance(req, dict) or type(req.get("campaign")) is not str:
            return error(400, 'body must be {"campaign": ..., "rule": ... (optional)}')
        rule = req.get("rule")
        if rule is not None and type(rule) is not str:
            return error(400, "rule must be a string")
        runs = await asyncio.to_thread(self.failed.list, req["campaign"], rule, MAX_REPLAY)
        runs.reverse()  # oldest first: a user's replays keep the order its events had
        versions = await asyncio.to_thread(self.versions)
        events = [_replay_event(r, versions.get((r["event"]["campaign"], r["rule"]), 0)) for r in runs]
        results: list[dict[str, Any]] = []
        for i in range(0, len(events), CHUNK):  # in order: a user's replays keep the order of its events
            results += await self.router.route(events[i:i + CHUNK], self.call_shard, "process_events", encoded=False)
        replayed = [r for r in results if r["status"] == "applied" and not r["errors"]]
        again = [r for r in results if r["status"] == "applied" and r["errors"]]
        summary = {"found": len(runs), "replayed": len(replayed), "failed_again": len(again),
                   "already_replayed": sum(r["status"] == "duplicate" for r in results),
                   "refused": [{"id": r["id"], "errors": r["errors"]} for r in results if r["status"] == "rejected"],
                   "errors": [{"id": r["id"], "errors": r["errors"]} for r in again][:100],
                   "actions": [a for r in replayed for a in r["actions"]], "more": len(runs) == MAX_REPLAY}
        self.audit.record(who, "failed.replay", req["campaign"] + (f"/{rule}" if rule else ""),
                          {k: summary[k] for k in ("found", "replayed", "failed_again", "already_replayed")})
        return reply(200, summary)


def _replay_event(run: dict[str, Any], version: int) -> Replay:
    ev = run["event"]
    data = ev.get("data")
    return Replay(replay_id(run["id"], version), ev["campaign"], ev["user"], ev["type"], ev["ts"],
                  msgspec.Raw(msgspec.msgpack.encode(data)) if data else NO_DATA, ev.get("cause"),
                  ev.get("depth", 0), rule=run["rule"], failed=run["id"])
