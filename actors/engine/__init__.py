"""The pure decision core: engine, events, user state, caps, clock, budgets, decisions, keys. No Redis, no Ray."""

from __future__ import annotations

from playbus.actors.engine.budgets import Budgets, LocalBudgets
from playbus.actors.engine.engine import BatchOutcome, ShardEngine
from playbus.actors.engine.errors import EngineError, PlaybusError, StateError
from playbus.actors.engine.events import Event, EventIn, Rejected, check_event
from playbus.actors.engine.keys import action_id, key_group, user_key

__all__ = [
    "BatchOutcome",
    "Budgets",
    "EngineError",
    "Event",
    "EventIn",
    "LocalBudgets",
    "PlaybusError",
    "Rejected",
    "ShardEngine",
    "StateError",
    "action_id",
    "check_event",
    "key_group",
    "user_key",
]
