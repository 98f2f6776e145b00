"""AuditLog: every change made through the admin API, who (the label of the admin token), what and when.

    playbus:audit   stream  field "entry" = {"ts": ms, "who": label, "action": "script.push" | ..., "target": ...,
                            "detail": {...}} as JSON, trimmed to about `maxlen` entries
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

__all__ = ["AUDIT_STREAM", "AuditLog"]

AUDIT_STREAM = "playbus:audit"


class AuditLog:
    """Appends and reads the audit stream (a change is recorded once it is done)."""

    def __init__(self, client: redis.Redis, maxlen: int = 100_000) -> None:
        self.client = client
        self.maxlen = maxlen

    def record(self, who: str, action: str, target: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
        entry = {"ts": int(time.time() * 1000), "who": who, "action": action, "target": target,
                 "detail": detail or {}}
        self.client.xadd(AUDIT_STREAM, {"entry": json.dumps(entry, default=str)}, maxlen=self.maxlen,
                         approximate=True)
        return entry

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest `limit` entries, newest first."""
        if limit <= 0:
            return []
        rows: Any = self.client.xrevrange(AUDIT_STREAM, count=limit)
        return [json.loads(fields[b"entry"]) for _, fields in rows]
