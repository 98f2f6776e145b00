"""CampaignState: the running configuration of the campaigns and what operators change on them, in Redis, shared
by all shards.

    playbus:{campaigns}:config       hash    campaign id -> JSON {"campaign": document (config.schema
                                             .campaign_document), "origin": "file" | "api", "file": digest of the
                                             document last loaded from the configuration file, or null}
    playbus:{campaigns}:state        hash    campaign id -> JSON {"paused": bool}
    playbus:{campaigns}:generation   string  bumped by every change: shards reload the state when it moves
    playbus:budget-total:{<campaign>:<name>}  string  a budget's total: the config's, plus every top-up (its
                                              counter of what no shard holds, `playbus:budget:{...}`, shares
                                              the hash tag, so a top-up raises both in one transaction, valid on
                                              Redis Cluster too)
Every transaction here stays in one slot ({campaigns}, or one budget's tag), as Redis Cluster requires.
The running configuration is what shards decide with. At every start the file's campaigns are deployed like
its scripts (`deploy_file`): a campaign whose document in the file differs from the one last loaded from the file
replaces the running one (an edited file is a deploy); an unchanged one leaves whatever operators put since
(`PUT /v1/campaigns/{id}`); campaigns created through the API are kept. The pause state survives restarts and
file edits (a paused campaign stays paused until it is resumed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from playbus.actors.store.leases import budget_key

__all__ = ["GENERATION", "CampaignState", "budget_total_key"]

CONFIG = "playbus:{campaigns}:config"
STATE = "playbus:{campaigns}:state"
GENERATION = "playbus:{campaigns}:generation"


def budget_total_key(campaign: str, name: str) -> str:
    """A budget's total (the config's plus top-ups), in the slot of its counter."""
    return f"playbus:budget-total:{{{campaign}:{name}}}"


class CampaignState:
    """Pause flags and budget totals; every change bumps the generation the shards watch."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def deploy_file(self, docs: Mapping[str, dict[str, Any]]) -> list[str]:
        """Deploy the configuration file's campaigns (id -> document): the ids whose running configuration it
        replaced (new, or changed in the file since it was last loaded from it)."""
        changed = []
        stored: Any = self.client.hmget(CONFIG, list(docs)) if docs else []
        for (cid, doc), raw in zip(docs.items(), stored, strict=True):
            digest = _digest(doc)
            if raw is not None and json.loads(raw).get("file") == digest:
                continue
            self.client.hset(CONFIG, cid, json.dumps({"campaign": doc, "origin": "file", "file": digest}))
            changed.append(cid)
        if changed:
            self.client.incr(GENERATION)
        return changed

    def put(self, doc: dict[str, Any]) -> bool:
        """Create or replace a campaign's running configuration (from the admin API); whether it is new."""
        raw: Any = self.client.hget(CONFIG, doc["id"])
        old = json.loads(raw) if raw else {}
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(CONFIG, doc["id"], json.dumps({"campaign": doc, "origin": "api", "file": old.get("file")}))
        pipe.incr(GENERATION)
        pipe.execute()
        return not old

    def configs(self) -> dict[str, dict[str, Any]]:
        """campaign id -> its running document."""
        raw: Any = self.client.hgetall(CONFIG)
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v)["campaign"] for k, v in raw.items()}

    def generation(self) -> int:
        return int(self.client.get(GENERATION) or 0)

    def all(self) -> dict[str, dict[str, Any]]:
        """campaign id -> its state ({"paused": bool})."""
        raw: Any = self.client.hgetall(STATE)
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}

    def get(self, campaign: str) -> dict[str, Any]:
        raw: Any = self.client.hget(STATE, campaign)
        return json.loads(raw) if raw else {"paused": False}

    def set_paused(self, campaign: str, paused: bool) -> bool:
        """Pause or resume; whether it changed anything."""
        state = self.get(campaign)
        if state.get("paused", False) == paused:
            return False
        state["paused"] = paused
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(STATE, campaign, json.dumps(state))
        pipe.incr(GENERATION)
        pipe.execute()
        return True

    def init_budgets(self, budgets: Iterable[tuple[str, str, int]]) -> None:
        """Record each (campaign, budget, total from the config) once: the first start sets the total."""
        pipe = self.client.pipeline(transaction=False)
        for campaign, name, total in budgets:
            pipe.set(budget_total_key(campaign, name), total, nx=True)
        pipe.execute()

    def top_up(self, campaign: str, name: str, amount: int) -> int:
        """Raise a budget's total and what no shard holds by `amount`, atomically (both keys share a slot); then
        bump the generation (another slot), which only tells the shards to look again sooner; the new total."""
        pipe = self.client.pipeline(transaction=True)
        pipe.incrby(budget_total_key(campaign, name), amount)
        pipe.incrby(budget_key(campaign, name), amount)
        total, _ = pipe.execute()
        self.client.incr(GENERATION)
        return int(total)

    def budgets(self, campaign: str, names: list[str]) -> dict[str, tuple[int, int]]:
        """name -> (total, not yet leased to any shard)."""
        if not names:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for n in names:
            pipe.get(budget_total_key(campaign, n))
            pipe.get(budget_key(campaign, n))
        got = pipe.execute()
        return {n: (int(got[2 * i] or 0), int(got[2 * i + 1] or 0)) for i, n in enumerate(names)}


def _digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
