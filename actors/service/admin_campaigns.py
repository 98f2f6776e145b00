"""CampaignAdmin: operating running campaigns over the admin API (plain Python).

    GET  /v1/campaigns                               every running campaign, as GET /v1/campaigns/{id} shows each
    GET  /v1/campaigns/{id}                          the campaign as it runs, with its state
    PUT  /v1/campaigns/{id}                          create or replace it (the shape of one `campaigns` item, scripts
                                                     by name), validated like the file: 422 naming the bad field
    POST /v1/campaigns/{id}/pause | /resume          a kill switch: while paused, its events are applied with no rule
                                                     run; every shard applies it before its next batch (pushed to
                                                     the shards at once; they also look every 0.5 s)
    POST /v1/campaigns/{id}/budgets/{name}/topup     {"amount": N}: raises the budget's total
    GET  /v1/campaigns/{id}/stats                    budgets, grants, refusals, rule runs and errors, delivery
Every change is written to the audit log. The running configuration and the state live in Redis
(store/campaigns.py) and survive restarts.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis

from playbus.actors.engine.keys import group_prefix
from playbus.actors.service.replies import Response, error, reply
from playbus.actors.service.router import Router
from playbus.actors.store.audit import AuditLog
from playbus.actors.store.campaigns import CampaignState
from playbus.actors.store.catalog import ScriptCatalog
from playbus.actors.store.outbox import DEAD_STREAM
from playbus.config.errors import ConfigError
from playbus.config.loader import parse_campaign, with_campaigns
from playbus.config.schema import CampaignConfig, Config, campaign_document

__all__ = ["CampaignAdmin"]

ShardCall = Callable[[int, str, Sequence[Any]], Awaitable[Any]]
_PATH = re.compile(r"^/v1/campaigns/([A-Za-z0-9_][A-Za-z0-9_\-]*)(?:/(pause|resume|stats|budgets/([^/]+)/topup))?$")
MAX_TOPUP = 10**15
SCAN_MAX = 100_000  # delivery entries looked at per stats call (outboxes and dead letters)


class CampaignAdmin:
    """The campaign endpoints of one ingress replica."""

    def __init__(self, config: Config, client: redis.Redis, call_shard: ShardCall, audit: AuditLog,
                 catalog: ScriptCatalog, router: Router | None = None) -> None:
        """`router`: the shard layout the ingress routes by (changes reach its shards)."""
        self.config = config
        self.router = router if router is not None else Router(config.shards, config.key_groups)
        self.client = client
        self.state = CampaignState(client)
        self.call_shard = call_shard
        self.audit = audit
        self.catalog = catalog

    def running(self) -> Config:
        """The configuration the shards run: the file's, with the campaigns as Redis keeps them."""
        return with_campaigns(self.config, self.state.configs(), self.catalog.active_sources())

    def listing(self) -> list[dict[str, Any]]:
        """Every running campaign (the file's and those created through the API), by id, with its state."""
        states = self.state.all()
        return [{**campaign_document(c), "paused": False, **states.get(c.id, {})}
                for c in sorted(self.running().campaigns, key=lambda c: c.id)]

    async def handle(self, method: str, path: str, query: str, who: str, body: bytes) -> Response:
        m = _PATH.match(path)
        if not m:
            return error(404, f"no such endpoint: {method} {path}")
        cid, op, budget = m.group(1), m.group(2), m.group(3)
        if op is None and method == "PUT":
            return await self.put(cid, body, who)
        campaigns = {c.id: c for c in self.running().campaigns}
        camp = campaigns.get(cid)
        if camp is None:
            return error(404, f"no campaign {cid!r} (campaigns: {', '.join(sorted(campaigns)) or 'none'})")
        if op is None:
            if method != "GET":
                return error(405, f"{method} is not allowed on {path}: GET or PUT")
            return reply(200, {**campaign_document(camp), **self.state.get(cid)})
        if op in ("pause", "resume"):
            if method != "POST":
                return error(405, "use POST")
            changed = self.state.set_paused(cid, op == "pause")
            if changed:  # recorded once stored: the shards apply it at their next look even if telling them fails
                self.audit.record(who, f"campaign.{op}", cid)
            await self._tell_shards()
            return reply(200, {"id": cid, "paused": op == "pause", "changed": changed})
        if op == "stats":
            if method != "GET":
                return error(405, "use GET")
            return reply(200, await self.stats(camp))
        if method != "POST":
            return error(405, "use POST")
        return await self.top_up(camp, budget or "", body, who)

    async def put(self, cid: str, body: bytes, who: str) -> Response:
        """Create or replace a campaign (validated like the file's, 422 naming the bad field); every shard runs it
        from its next batch."""
        try:
            doc = json.loads(body or b"null")
        except ValueError as e:
            return error(400, f"body is not valid JSON: {getattr(e, 'msg', e)}")
        if isinstance(doc, dict) and doc.get("id", cid) != cid:
            return reply(422, {"error": f"id: {doc['id']!r} differs from the path's {cid!r}", "field": "id"})
        if isinstance(doc, dict):
            doc = {**doc, "id": cid}
        try:
            camp = parse_campaign(doc, self.config, self.catalog.active_sources())
        except ConfigError as e:
            return reply(422, {"error": e.message, "field": e.path})
        document = campaign_document(camp)
        created = self.state.put(document)
        self.audit.record(who, "campaign.create" if created else "campaign.replace", cid,
                          {"rules": [r.id for r in camp.rules], "caps": len(camp.caps),
                           "budgets": [b.name for b in camp.budgets]})
        await self._tell_shards()
        return reply(201 if created else 200, {**document, **self.state.get(cid)})

    async def _tell_shards(self) -> None:
        """Make every shard apply the new state now (it would within CATALOG_CHECK_S anyway)."""
        await asyncio.gather(*(self.call_shard(s, "campaigns_changed", ()) for s in range(self.router.shards)))

    async def top_up(self, camp: CampaignConfig, name: str, body: bytes, who: str) -> Response:
        if name not in {b.name for b in camp.budgets}:
            return error(404, f"campaign {camp.id!r} has no budget {name!r} "
                              f"(budgets: {', '.join(b.name for b in camp.budgets) or 'none'})")
        try:
            req = json.loads(body or b"null")
        except ValueError as e:
            return error(400, f"body is not valid JSON: {getattr(e, 'msg', e)}")
        amount = req.get("amount") if isinstance(req, dict) else None
        if type(amount) is not int or not 0 < amount <= MAX_TOPUP:
            return error(422, f"amount: expected a positive integer of at most {MAX_TOPUP}, got {amount!r}")
        total = self.state.top_up(camp.id, name, amount)
        self.audit.record(who, "budget.topup", f"{camp.id}/{name}", {"amount": amount, "total": total})
        await self._tell_shards()
        return reply(200, {"campaign": camp.id, "budget": name, "total": total})

    async def stats(self, camp: CampaignConfig) -> dict[str, Any]:
        """Budgets (total, spent, left: left = not leased + leased and unspent in the shards), and the counters
        the commits keep per key group (store.commit.stat_counts), summed; delivery backlog and dead letters."""
        names = [b.name for b in camp.budgets]
        leases = await asyncio.gather(*(self.call_shard(s, "budget_leases", ()) for s in range(self.router.shards)))
        budgets = {}
        for name, (total, unleased) in self.state.budgets(camp.id, names).items():
            held = sum(max(0, int(got.get(f"{camp.id}\x00{name}", 0))) for got in leases)
            left = unleased + held
            budgets[name] = {"total": total, "spent": total - left, "left": left}
        pipe = self.client.pipeline(transaction=False)
        for kg in range(self.config.key_groups):
            pipe.hgetall(group_prefix(kg) + "stats")
        prefix = f"{camp.id}\x00".encode()
        grants: dict[str, int] = {}
        refusals: dict[str, int] = {}
        rules: dict[str, dict[str, dict[str, int]]] = {}
        groups: Any = pipe.execute()
        for fields in groups:
            for raw, n in fields.items():
                if not raw.startswith(prefix):
                    continue
                kind, *rest = raw[len(prefix):].decode().split("\x00")
                count = int(n)
                if kind == "grants":
                    grants[rest[0]] = grants.get(rest[0], 0) + count
                elif kind == "refusals":
                    refusals[rest[0]] = refusals.get(rest[0], 0) + count
                elif kind in ("runs", "errors"):
                    per = rules.setdefault(rest[0], {}).setdefault(rest[1], {"runs": 0, "errors": 0})
                    per[kind] += count
        return {"campaign": camp.id, "paused": bool(self.state.get(camp.id).get("paused")), "budgets": budgets,
                "grants": grants, "refusals": refusals, "rules": rules, "delivery": self._delivery(camp.id)}

    def _delivery(self, campaign: str) -> dict[str, Any]:
        """Actions of the campaign waiting in the outboxes (not yet delivered) and given up (dead letters), counted
        over at most SCAN_MAX entries each ("exact": False past that)."""
        needle = f'"campaign":"{campaign}"'.encode()
        backlog = dead = seen = 0
        exact = True
        for key in [group_prefix(kg) + "outbox" for kg in range(self.config.key_groups)] + [DEAD_STREAM]:
            entries: Any = self.client.xrange(key, count=SCAN_MAX - seen) if seen < SCAN_MAX else []
            for _, fields in entries:
                seen += 1
                if needle in fields.get(b"action", b""):
                    if key == DEAD_STREAM:
                        dead += 1
                    else:
                        backlog += 1
            if seen >= SCAN_MAX:
                exact = False
                break
        return {"backlog": backlog, "dead": dead, "exact": exact}
