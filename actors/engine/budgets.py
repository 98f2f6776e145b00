"""Campaign budgets: the interface the engine spends through, and the in-memory implementation."""

from __future__ import annotations

from typing import Protocol

from playbus.config.schema import Config

__all__ = ["Budgets", "LocalBudgets"]


class Budgets(Protocol):
    """Spends from campaign-wide budgets; an implementation must never allow an overspend."""

    def try_spend(self, campaign: str, budget: str, amount: int) -> bool:
        """Take `amount` from the budget if that much is left; False (and nothing taken) otherwise."""
        ...


class LocalBudgets:
    """All budgets in this process's memory: exact, for one shard, dry runs and tests."""

    def __init__(self, config: Config | None = None, remaining: dict[tuple[str, str], int] | None = None) -> None:
        self.remaining: dict[tuple[str, str], int] = dict(remaining or {})
        if config is not None:
            for c in config.campaigns:
                for b in c.budgets:
                    self.remaining.setdefault((c.id, b.name), b.total)

    def try_spend(self, campaign: str, budget: str, amount: int) -> bool:
        key = (campaign, budget)
        left = self.remaining.get(key, 0)
        if amount < 0 or amount > left:
            return False
        self.remaining[key] = left - amount
        return True
