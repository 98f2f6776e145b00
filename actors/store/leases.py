"""LeasedBudgets: campaign budgets shared by all shards, leased from Redis in blocks and spent locally.

Each budget is a Redis counter `playbus:budget:{<campaign>:<name>}` of what no shard holds yet. A shard
takes a block with one atomic script and spends it in memory (no network call per grant); Redis only
ever hands out what it has, so the shards together never overspend. Near the end blocks shrink to a
fraction of what is left, and a shard that cannot get a block asks for exactly what it needs, so little
stays stranded in other shards' leases. `release()` gives unused leases back.

Limits (by design): the counter is initialised once to `total` (SET NX); changing `total` in the config
later does not change it (adjust the counter by hand). A lease held by a shard that crashes is lost to the
campaign (an underspend, never an overspend); so is budget spent for a batch whose commit then failed.
One instance per shard, used by one thread.
"""

from __future__ import annotations

from typing import Any

import redis

from playbus.actors.store.scripts import lua
from playbus.config.schema import Config

__all__ = ["LeasedBudgets", "budget_key"]

def budget_key(campaign: str, name: str) -> str:
    """The Redis counter of one budget; the hash tag keeps it in one slot on Redis Cluster."""
    return f"playbus:budget:{{{campaign}:{name}}}"


class LeasedBudgets:
    """The Budgets protocol over Redis: exact across shards, one round trip per block, not per grant."""

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
        self.leased: dict[tuple[str, str], int] = {}
        self.blocks: dict[tuple[str, str], int] = {}
        self.keys: dict[tuple[str, str], str] = {}
        self.round_trips = 0
        self._lease = client.register_script(lua("lease"))
        pipe = client.pipeline(transaction=False)
        for c in config.campaigns:
            for b in c.budgets:
                k = (c.id, b.name)
                self.keys[k] = budget_key(c.id, b.name)
                self.blocks[k] = max(min_block, int(b.total * block_fraction))
                self.leased[k] = 0
                pipe.set(self.keys[k], b.total, nx=True)
        if self.keys:
            pipe.execute()
            self.round_trips += 1

    def try_spend(self, campaign: str, budget: str, amount: Any) -> bool:
        """Take `amount` from the local lease, leasing more from Redis when it runs short."""
        if type(amount) is not int:
            if type(amount) is float and amount.is_integer():
                amount = int(amount)
            else:
                return False
        k = (campaign, budget)
        have = self.leased.get(k)
        if have is None or amount < 0:
            return False
        if amount <= have:
            self.leased[k] = have - amount
            return True
        need = amount - have
        taken = self._take(k, max(need, self.blocks[k]), need)
        if taken < need:  # the script gives `need` or more, or nothing
            return False
        self.leased[k] = have + taken - amount
        return True

    def _take(self, k: tuple[str, str], block: int, need: int) -> int:
        self.round_trips += 1
        taken, _left = self._lease(keys=[self.keys[k]], args=[block, need, self.spread])
        return int(taken)

    def release(self) -> dict[tuple[str, str], int]:
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

    def remaining(self, campaign: str, name: str) -> int:
        """What Redis still holds for this budget (not counting what shards have leased and not spent)."""
        self.round_trips += 1
        return int(self.client.get(budget_key(campaign, name)) or 0)

    def held(self, campaign: str, name: str) -> int:
        """This shard's unspent lease of a budget."""
        return self.leased.get((campaign, name), 0)
