"""LeasedBudgets: campaign budgets shared by all shards, leased from Redis in blocks and spent locally.

Each budget is a Redis counter `playbus:budget:{<campaign>:<name>}` of what no shard holds yet. A shard takes
a block with one atomic script and spends it in memory; Redis only ever hands out what it has, so the shards
together never overspend. Spending does no I/O (the engine's decide loop stays pure):

- `try_spend` takes from the local lease. When the lease is short and Redis may hold more, it lets the lease
  go below zero (an overdraft) instead of refusing; after the batch, `deficit()` says how much is missing and
  the shard rolls the batch back (`mark`/`rollback`), leases the deficit (`refill`, I/O, between batches) and
  decides the batch again. When Redis has nothing left, the budget is `exhausted`: grants that the lease
  cannot cover are then refused, until a later look finds more (a top-up).
- `prefill` tops low leases up between batches, so that overdrafts stay rare.

Near the end blocks shrink to a fraction of what is left, so little stays stranded in other shards' leases.
`release()` gives unused leases back. A lease held by a shard that crashes, and budget spent by a batch whose
commit failed, is lost to the campaign: an underspend, never an overspend. One instance per shard, used by
one thread at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis

from playbus.actors.store.connect import is_cluster_client
from playbus.actors.store.scripts import lua
from playbus.actors.store.slots import evalsha, execute
from playbus.config.schema import CampaignConfig, Config

__all__ = ["LeasedBudgets", "budget_key"]

_Key = tuple[str, str]
RECHECK_S = 2.0  # how long an exhausted budget is believed before Redis is asked again (a top-up may have come)


def budget_key(campaign: str, name: str) -> str:
    """The Redis counter of one budget; the hash tag keeps it in one slot on Redis Cluster."""
    return f"playbus:budget:{{{campaign}:{name}}}"


class LeasedBudgets:
    """The Budgets protocol over Redis: exact across shards, one round trip per block, never one per grant."""

    def __init__(
        self,
        client: redis.Redis,
        config: Config,
        block_fraction: float = 0.005,
        min_block: int = 1,
        spread: int = 16,
    ) -> None:
        if not 0 < block_fraction <= 1:
            raise ValueError("block_fraction must be in (0, 1]")
        self.client = client
        self.spread = max(1, spread)
        self.leased: dict[_Key, int] = {}
        self.blocks: dict[_Key, int] = {}
        self.keys: dict[_Key, str] = {}
        self.exhausted: dict[_Key, float] = {}  # budget -> when Redis last had too little for a deficit
        self.round_trips = 0
        self._lease = client.register_script(lua("lease"))
        self.block_fraction = block_fraction
        self.min_block = min_block
        for c in config.campaigns:
            self.add_campaign(c)

    def add_campaign(self, campaign: CampaignConfig) -> None:
        """Know this campaign's budgets (a campaign added or replaced while running): each counter is created
        with its total the first time, and a budget already known keeps its lease."""
        pipe = self.client.pipeline(transaction=False)
        for b in campaign.budgets:
            k = (campaign.id, b.name)
            self.keys[k] = budget_key(campaign.id, b.name)
            self.blocks[k] = max(self.min_block, int(b.total * self.block_fraction))
            self.leased.setdefault(k, 0)
            pipe.set(self.keys[k], b.total, nx=True)
        if campaign.budgets:
            pipe.execute()
            self.round_trips += 1

    # -- spending (no I/O) -------------------------------------------------------------------------
    def try_spend(self, campaign: str, spends: Sequence[tuple[str, Any]]) -> str:
        """Take every (budget, amount) or none; "" or the name of a budget that refuses. Overdraws a budget
        that Redis may still cover (see the module docstring): check `deficit()` after the batch."""
        leased, exhausted = self.leased, self.exhausted
        for budget, amount in spends:
            if type(amount) is not int or amount < 0:
                return budget
            have = leased.get((campaign, budget))
            if have is None or (amount > have and (campaign, budget) in exhausted):
                return budget
        for budget, amount in spends:
            leased[(campaign, budget)] -= amount
        return ""

    def deficit(self) -> dict[_Key, int]:
        """How much each overdrawn budget is short by (empty when no lease went below zero)."""
        return {k: -v for k, v in self.leased.items() if v < 0}

    def mark(self) -> dict[_Key, int]:
        """The leases now, to roll a batch's spending back to."""
        return dict(self.leased)

    def rollback(self, mark: dict[_Key, int]) -> None:
        """Undo what was spent since `mark` (for a batch that will be decided again, or not committed at all)."""
        self.leased = dict(mark)

    # -- leasing (I/O, between batches) ------------------------------------------------------------
    def needs_prefill(self) -> bool:
        """True when a lease is below half a block, or an exhausted budget is due for a new look."""
        now = time.monotonic()
        for k, have in self.leased.items():
            when = self.exhausted.get(k)
            if when is None:
                if have < self.blocks[k] // 2 + 1:
                    return True
            elif now - when > RECHECK_S:
                return True
        return False

    def prefill(self) -> bool:
        """Top low leases up to a block (and look again at exhausted budgets); True if a lease grew."""
        now = time.monotonic()
        wants = {k: 0 for k, have in self.leased.items()
                 if (k not in self.exhausted and have < self.blocks[k] // 2 + 1)
                 or (k in self.exhausted and now - self.exhausted[k] > RECHECK_S)}
        return self.refill(wants) if wants else False

    def refill(self, needs: dict[_Key, int]) -> bool:
        """Lease at least `needs[k]` more of each budget (a block when Redis can spare one), in one round
        trip. A budget whose counter had less than its need gives what it had; a counter left at zero marks the
        budget exhausted. Returns True if any lease grew."""
        keys = list(needs)
        if not keys:
            return False
        calls: list[tuple[list[str], list[Any]]] = []
        for k in keys:
            need = max(0, needs[k])
            calls.append(([self.keys[k]], [max(need + self.blocks[k], self.blocks[k]), need, self.spread]))
        self.round_trips += 1
        if is_cluster_client(self.client):  # each budget's counter in its own slot: store.slots runs the calls
            answers: list[Any] = execute(self.client, [evalsha(self._lease.sha, ks, a) for ks, a in calls],
                                         scripts=[lua("lease")])
        else:
            pipe = self.client.pipeline(transaction=False)
            for ks, a in calls:
                self._lease(keys=ks, args=a, client=pipe)
            answers = pipe.execute()
        grew = False
        now = time.monotonic()
        error: Exception | None = None
        for k, answer in zip(keys, answers, strict=True):
            if isinstance(answer, Exception):  # what the other budgets gave is kept
                error = error or answer
                continue
            taken, left = answer
            self.leased[k] += int(taken)
            grew = grew or int(taken) > 0
            if int(left) <= 0:  # Redis has nothing more: what the lease cannot cover is refused
                self.exhausted[k] = now
            else:
                self.exhausted.pop(k, None)
        if error is not None:
            raise error
        return grew

    def release(self) -> dict[_Key, int]:
        """Give every unused lease back to Redis (on shutdown or when giving up key groups)."""
        back = {k: v for k, v in self.leased.items() if v > 0}
        if not back:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for k, v in back.items():
            pipe.incrby(self.keys[k], v)
        pipe.execute()
        self.round_trips += 1
        for k in back:
            self.leased[k] = 0
        return back

    # -- reading -----------------------------------------------------------------------------------
    def remaining(self, campaign: str, name: str) -> int:
        """What Redis still holds for this budget (not counting what shards have leased and not spent)."""
        self.round_trips += 1
        return int(self.client.get(budget_key(campaign, name)) or 0)

    def held(self, campaign: str, name: str) -> int:
        """This shard's unspent lease of a budget."""
        return self.leased.get((campaign, name), 0)
