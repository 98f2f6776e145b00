"""Campaign budgets: the interface the engine spends through, and the in-memory implementation.

A grant may need several budgets (all the budgets on its action type): it spends all of them or none.
Spending never does I/O: an implementation that holds budget elsewhere (leases of a Redis counter) refills
between batches, and raises BudgetShortage from inside a batch when what it holds locally is not enough but
more may exist; the batch is then decided again after a refill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from playbus.actors.engine.errors import EngineError
from playbus.config.schema import Config

__all__ = ["BudgetShortage", "Budgets", "LocalBudgets"]


class BudgetShortage(EngineError):
    """A grant needs more of a budget than this process holds, and more may be available elsewhere: refill,
    then decide the batch again. `needs` is "campaign\\x00budget=amount;..." (a plain string, so it pickles)."""

    def __init__(self, message: str, needs: str = "") -> None:
        super().__init__(message)
        self.needs = needs

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # type: ignore[override]
        return (type(self), (self.message, self.needs))

    def amounts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for part in self.needs.split(";"):
            if part:
                key, _, amount = part.rpartition("=")
                campaign, _, budget = key.partition("\x00")
                out[(campaign, budget)] = int(amount)
        return out


class Budgets(Protocol):
    """Spends from campaign-wide budgets; an implementation must never allow an overspend."""

    def try_spend(self, campaign: str, spends: Sequence[tuple[str, int]]) -> str:
        """Take every (budget, amount) if all of them can be covered and return ""; else take nothing and
        return the name of a budget that cannot cover its amount. May raise BudgetShortage."""
        ...


class LocalBudgets:
    """All budgets in this process's memory: exact, for one process, dry runs and tests."""

    def __init__(self, config: Config | None = None, remaining: dict[tuple[str, str], int] | None = None) -> None:
        self.remaining: dict[tuple[str, str], int] = dict(remaining or {})
        if config is not None:
            for c in config.campaigns:
                for b in c.budgets:
                    self.remaining.setdefault((c.id, b.name), b.total)

    def try_spend(self, campaign: str, spends: Sequence[tuple[str, int]]) -> str:
        for budget, amount in spends:
            if type(amount) is not int or amount < 0 or amount > self.remaining.get((campaign, budget), 0):
                return budget
        for budget, amount in spends:
            self.remaining[(campaign, budget)] -= amount
        return ""
