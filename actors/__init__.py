"""The shard engine and what surrounds it: state, caps, budgets, and (at the edge) the Ray actors."""

from __future__ import annotations

from actors.budgets import Budgets, LocalBudgets
from actors.engine import BatchOutcome, ShardEngine, action_id, user_key
from actors.envelope import Event, check_event
from actors.errors import EngineError, StateError

__all__ = [
    "BatchOutcome",
    "Budgets",
    "EngineError",
    "Event",
    "LocalBudgets",
    "ShardEngine",
    "StateError",
    "action_id",
    "check_event",
    "user_key",
]
