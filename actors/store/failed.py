"""FailedRuns: the rule runs that failed, kept per key group for replay (补单).

    playbus:{kgN}:failed   stream  field "entry" = JSON {"event", "rule", "script_version", "error"} (written by the
                                   commit unit of the batch where the run failed; removed by the commit unit of
                                   the batch where its replay ran: store/commit.py)
An entry is named "<key group>/<stream entry id>".
"""

from __future__ import annotations

import json
from typing import Any

import redis

from playbus.actors.engine.keys import group_prefix

__all__ = ["FailedRuns"]

PAGE = 1000


class FailedRuns:
    """Reads the failed runs of every key group (newest first), filtered by campaign and rule."""

    def __init__(self, client: redis.Redis, key_groups: int) -> None:
        self.client = client
        self.key_groups = key_groups

    def list(self, campaign: str | None = None, rule: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Up to `limit` failed runs, newest first: {"id", "event", "rule", "script_version", "error", "at"}."""
        found: list[dict[str, Any]] = []
        for kg in range(self.key_groups):
            key = group_prefix(kg) + "failed"
            end = "+"
            while True:
                page: Any = self.client.xrevrange(key, max=end, count=PAGE)
                for entry_id, fields in page:
                    eid = entry_id.decode()
                    try:
                        doc = json.loads(fields[b"entry"])
                    except (KeyError, ValueError):
                        continue
                    if (campaign is None or doc["event"].get("campaign") == campaign) and \
                            (rule is None or doc.get("rule") == rule):
                        found.append({"id": f"{kg}/{eid}", **doc, "at": int(eid.split("-")[0])})
                if len(page) < PAGE:
                    break
                end = "(" + page[-1][0].decode()
        found.sort(key=lambda d: d["at"], reverse=True)
        return found[:limit]
