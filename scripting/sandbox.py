"""The Lua sandbox: one lupa Lua 5.4 runtime holding compiled scripts, rules and users' contexts.

Python talks to the trusted driver (driver.lua) only in msgpack bytes and flat tables, so no Python object
is ever reachable from Lua, and a whole micro-batch crosses the boundary in one call each way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import lupa.lua54 as lua54
import msgpack
import msgspec

from playbus.scripting.errors import ScriptCompileError

__all__ = ["BUDGET_ERROR", "MEMORY_ERROR", "STRIDE", "TIME_ERROR", "Sandbox"]

STRIDE = 8  # fields per event in run_batch's flat column table: id, user, ts, day, data, context slot, rule set,
# chain depth
BUDGET_ERROR = "instruction budget exceeded"
MEMORY_ERROR = "memory cap exceeded"
TIME_ERROR = "cpu time limit exceeded"  # backstop for C work no instruction count sees (see driver.lua)
_HOOK_EVERY = 1000  # instructions per count-hook call, as set in driver.lua
# The most a rule run's writes and emits may take (driver.lua's MAX_RUN_BYTES). The hard memory limit is raised
# per batch by twice this per run (Lua pieces and the final concat), so that building a batch's result can
# never fail it: what one run gets never depends on the rest of the batch.
_RUN_BYTES = 65536
_decode = msgspec.msgpack.Decoder().decode
_LINE = re.compile(r"^[^:]*:(\d+): (.*)$", re.S)


def _deny(obj: object, name: object, setting: bool) -> object:
    raise AttributeError("access to Python objects is not allowed")


class Sandbox:
    """Compiles scripts and runs batches of rule runs under an instruction budget and a memory cap."""

    def __init__(
        self, max_instructions: int = 1_000_000, max_memory_kb: int = 16_384, max_cpu_ms: int | None = None,
        max_context_kb: int = 64, disable_after: int = 20,
    ) -> None:
        """`max_context_kb`: the most a user's context may hold (msgpack); `disable_after`: a rule whose runs fail
        their budget (instructions, memory, CPU time) this many times in a row is disabled in this sandbox
        until a new version of its script is set."""
        self.max_instructions = max_instructions
        self.max_memory_kb = max_memory_kb
        # CPU-time backstop per rule run (driver.lua), far above what the instruction budget takes in pure
        # Lua (a few ns per instruction): 1 us per instruction, at least 100 ms.
        self.max_cpu_ms = max_cpu_ms if max_cpu_ms is not None else max(100, max_instructions // 1000)
        self._lua = lua54.LuaRuntime(
            encoding=None,
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            attribute_filter=_deny,
            max_memory=1 << 40,
        )
        # Hard limit of the whole runtime, re-armed per batch above live memory: a script that allocates
        # in one C call (string.rep, table.concat) fails there; the soft per-run cap is in the driver.
        self._headroom = 2 * max_memory_kb * 1024 + (16 << 20)
        source = resources.files("playbus.scripting").joinpath("driver.lua").read_bytes()
        hooks = max(1, max_instructions // _HOOK_EVERY)
        self._api = self._lua.execute(source, hooks, max_memory_kb, self.max_cpu_ms / 1000, max_context_kb * 1024,
                                      disable_after)
        self._next_handle = 1
        # Contexts live in Lua under small integers (a slot per user): cheaper to pass and to look up per event
        # than the keys, and a dense array in Lua. A freed slot is reused.
        self._free: list[int] = []
        self._top = 0  # the highest slot given out
        self._run_batch = self._api.run_batch
        self._table_from = self._lua.table_from

    def _handle(self) -> int:
        h = self._next_handle
        self._next_handle += 1
        return h

    # -- scripts and rules -------------------------------------------------------------------------
    def compile(self, name: str, source: str, version: int = 1) -> int:
        """Compile and load one script version; returns its handle or raises ScriptCompileError."""
        if not isinstance(source, str):
            raise ScriptCompileError(f"{name}: source must be text", name, version)
        if len(source) > 1_000_000:
            raise ScriptCompileError(f"{name}: source larger than 1 MB", name, version)
        h = self._handle()
        result = self._api.compile(h, name.encode(), source.encode())
        ok, err = (result if isinstance(result, tuple) else (result, None))
        if not ok:
            text = err.decode("utf-8", "replace") if isinstance(err, bytes) else str(err)
            m = _LINE.match(text)
            line = int(m.group(1)) if m else 0
            raise ScriptCompileError(text, name, version, line)
        return h

    def drop_script(self, handle: int) -> None:
        self._api.drop_script(handle)

    def define_rule(self, rule_id: str, script: int, emits: list[str], budget_params: dict[str, list[str]],
                    sends: Sequence[str] = ()) -> int:
        """A rule running `script`, allowed to emit `emits` and to send (`send`, `later`) events of the types
        `sends`; `budget_params`: action type -> the integer parameters its budgets spend (checked at emit)."""
        h = self._handle()
        self._api.define_rule(h, rule_id.encode(), script, msgpack.packb(list(emits)), msgpack.packb(budget_params),
                              msgpack.packb(list(sends)))
        return h

    def set_rule_script(self, rule: int, script: int) -> None:
        self._api.set_rule_script(rule, script)

    def set_rule_canary(self, rule: int, script: int, basis_points: int) -> None:
        """Users whose canary bucket is below `basis_points` (of 10,000) run `script` for this rule; script 0 ends
        the canary."""
        self._api.set_rule_canary(rule, script, basis_points)

    def define_ruleset(self, rules: list[int], campaign: str, event_type: str) -> int:
        """The rules (in order) that events of `event_type` run in `campaign` (what their scripts see as
        event.campaign and event.type)."""
        h = self._handle()
        self._api.define_ruleset(h, msgpack.packb(list(rules)), campaign.encode(), event_type.encode())
        return h

    # -- running -----------------------------------------------------------------------------------
    def run_batch(self, cols: list[Any], n: int, runs: int) -> list[list[Any]]:
        """Run the rule sets of `n` events (STRIDE fields each, `runs` rule runs in all); one
        [error, changes, effects] per rule run. An effect is an action [type, params] or an event a rule made:
        [1, type, data, user] (send), [2, type, data, delay_ms, key or False] (later), [3, key] (cancel)."""
        if n == 0:
            return []
        lua = self._lua
        lua.set_max_memory(lua.get_memory_used() + self._headroom + 2 * _RUN_BYTES * runs)
        records: list[list[Any]] = _decode(self._run_batch(self._table_from(cols), n, runs))
        return records

    def disabled_rules(self) -> list[tuple[str, str]]:
        """(rule id, why) of every rule disabled for failing its budget too often."""
        return [(r, why) for r, why in msgpack.unpackb(self._api.disabled_rules(), raw=False)]

    # -- contexts ----------------------------------------------------------------------------------
    # Contexts are named by slot: the engine keeps each user's (UserState.slot), nothing here maps keys.
    def new_slot(self) -> int:
        """A free slot (with no context): what run_batch's columns name."""
        if self._free:
            return self._free.pop()
        self._top += 1
        return self._top

    def free_slot(self, slot: int) -> None:
        """Drop a slot's context and give the slot back."""
        self._api.drop_context(slot)
        self._free.append(slot)

    def get_contexts(self, slots: list[int]) -> list[dict[str, Any] | None]:
        """The contexts in these slots (None where a slot has none; slot 0 is never used)."""
        if not slots:
            return []
        blob = self._api.get_contexts(self._table_from(slots), len(slots))
        return [c if c is not False else None for c in msgpack.unpackb(blob, raw=False, strict_map_key=False)]

    def get_context_blobs(self, slots: list[int]) -> list[bytes | None]:
        """The contexts in these slots as msgpack bytes, for snapshots."""
        if not slots:
            return []
        blob = self._api.get_context_blobs(self._table_from(slots), len(slots))
        return [b if b is not False else None for b in msgpack.unpackb(blob, raw=False)]

    def load_context(self, slot: int, context: dict[str, Any] | bytes) -> None:
        """Set the context in a slot (plain data or msgpack bytes of a map)."""
        self._api.load_context(slot, context if isinstance(context, bytes) else msgpack.packb(context))

    def memory_kb(self) -> float:
        """Live Lua memory in KiB after a full collection."""
        return float(self._api.collect())
