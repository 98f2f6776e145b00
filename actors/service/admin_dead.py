"""DeadLetterAdmin: the dead-letter endpoints of the admin API, plain Python.

    GET  /v1/dead?target=&limit=   the newest dead letters (limit: default 50, at most 1000), of one gameplay
    POST /v1/dead/redrive          {"ids": [action ids], "target": ...} or {"all": true, "target": ...}:
                                   queue them again for delivery with their original ids; audited

The caller (AdminApi) has checked the admin token; `who` is its label. Redis calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qs

from playbus.actors.service.replies import Response, error, reply
from playbus.actors.store.audit import AuditLog
from playbus.actors.store.deadletters import MAX_LIST, DeadLetters

__all__ = ["MAX_IDS", "MAX_IDS_ANSWERED", "DeadLetterAdmin"]

MAX_IDS = 10_000  # action ids in one redrive request
MAX_IDS_ANSWERED = 10_000  # action ids listed in a redrive answer ("ids_truncated" past that)
_AUDIT_IDS = 100  # action ids listed in an audit entry
_FIELDS = ("target", "ids", "all")


class DeadLetterAdmin:
    """/v1/dead and /v1/dead/redrive."""

    def __init__(self, dead: DeadLetters, audit: AuditLog) -> None:
        self.dead = dead
        self.audit = audit

    async def handle(self, method: str, path: str, query: str, who: str, body: bytes) -> Response:
        if path == "/v1/dead":
            if method != "GET":
                return error(405, f"{method} is not allowed on {path}: use GET")
            return await self.list(query)
        if path == "/v1/dead/redrive":
            if method != "POST":
                return error(405, f"{method} is not allowed on {path}: use POST")
            return await self.redrive(body, who)
        return error(404, f"no such endpoint: {method} {path}")

    async def list(self, query: str) -> Response:
        q = parse_qs(query, keep_blank_values=True)
        raw = q.get("limit", ["50"])[-1]
        try:
            limit = int(raw)
        except ValueError:
            return error(400, f"limit must be an integer from 0 to {MAX_LIST}, got {raw!r}")
        if limit < 0:
            return error(400, f"limit must be an integer from 0 to {MAX_LIST}, got {raw!r}")
        target = q.get("target", [""])[-1] or None
        dead = await asyncio.to_thread(self.dead.list, target, min(limit, MAX_LIST))
        return reply(200, {"dead": dead})

    async def redrive(self, body: bytes, who: str) -> Response:
        req = _redrive_request(body)
        if isinstance(req, str):
            return error(400, req)
        target, ids, everything = req
        res = await asyncio.to_thread(self.dead.redrive, target, ids, everything)
        redriven: list[str] = res["ids"]
        detail: dict[str, Any] = {"count": res["redriven"], "ids": redriven[:_AUDIT_IDS]}
        if len(redriven) > _AUDIT_IDS:
            detail["ids_truncated"] = True
        if everything:
            detail["all"] = True
        if res["not_found"]:
            detail["not_found"] = len(res["not_found"])
        await asyncio.to_thread(self.audit.record, who, "dead.redrive", target or "*", detail)
        answer: dict[str, Any] = {"redriven": res["redriven"], "ids": redriven[:MAX_IDS_ANSWERED],
                                  "not_found": res["not_found"]}
        if len(redriven) > MAX_IDS_ANSWERED:
            answer["ids_truncated"] = True
        return reply(200, answer)


def _redrive_request(body: bytes) -> tuple[str | None, list[str] | None, bool] | str:
    """(target, action ids or None, all) of a redrive body, or what is wrong with it (naming the field)."""
    usage = 'body must be JSON like {"ids": ["a-..."], "target": "wallet"} or {"all": true, "target": "wallet"}'
    try:
        req = json.loads(body or b"")
    except ValueError as e:  # JSONDecodeError or UnicodeDecodeError
        return f"body is not valid JSON ({getattr(e, 'msg', e)}): {usage}"
    if not isinstance(req, dict):
        return usage
    for k in req:
        if k not in _FIELDS:
            return f"unknown field {k!r}: {usage}"
    target = req.get("target")
    if target is not None and (not isinstance(target, str) or not target):
        return "target must be a non-empty string (a gameplay, e.g. \"wallet\")"
    everything = req.get("all", False)
    if not isinstance(everything, bool):
        return "all must be true or false"
    ids = req.get("ids")
    if ids is not None:
        if everything:
            return "give either ids or all, not both"
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            return "ids must be a list of action ids (non-empty strings)"
        if not ids:
            return "ids must name at least one action id"
        if len(ids) > MAX_IDS:
            return f"ids lists {len(ids)} action ids; at most {MAX_IDS} in one request"
    elif not everything:
        return f'ids is missing: name the action ids to redrive, or send "all": true. {usage}'
    return target, ids, everything
