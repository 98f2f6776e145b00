"""LocalRun: the decision engine with the events rules make handled in-process, on a virtual clock.

What the cluster does through Redis, a dry run does here: an event's `send`s are decided right after it (in the
order they were made, and the events those make after them), and timers fire by the clock of the events (an
event at time T first fires every timer due by T, in due order), then, at the end, up to a given time. No Redis,
no Ray, no wall clock: the same input always gives the same output.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from playbus.actors.engine.decisions import repeat_actions
from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.events import EventIn, Fired, check_event
from playbus.actors.engine.keys import user_key

__all__ = ["LocalRun", "Step"]


@dataclass
class Step:
    """One event decided: its result (the shape of a POST /v1/events result), the user it concerned (None when it
    was rejected) and, for an event a rule made, how ("send" or "timer"), by which event, at which depth."""

    result: dict[str, Any]
    campaign: str | None = None
    user: str | None = None
    context: dict[str, Any] | None = None  # the user's context right after this event
    via: str | None = None
    event: dict[str, Any] = field(default_factory=dict)

    def line(self) -> dict[str, Any]:
        """The result as a dry run prints it: plus the user's context, and for a made event what it was."""
        out = dict(self.result)
        out["context"] = self.context
        if self.via is not None:
            out["made"] = {"via": self.via, **self.event}
        return out


class LocalRun:
    """Decide events one by one through `engine`, with sends and timers (see the module's doc)."""

    def __init__(self, engine: ShardEngine, now_ms: int, context: dict[str, Any] | bytes | None = None,
                 max_steps: int = 1_000_000) -> None:
        """`now_ms`: the receive time of events without a `ts`; `context`: the starting context of every user
        the events reach; `max_steps`: a bound on the events decided in all (a rule that sends in a cycle stops
        at the chain depth limit, but fan-out can still multiply)."""
        self.engine = engine
        self.now_ms = now_ms
        self.context = context or None
        self.max_steps = max_steps
        self.steps = 0
        self.last_ts: int | None = None  # the latest event time decided
        self.longest_delay = 0  # the longest timer set so far
        self._timers: list[tuple[int, int, Fired]] = []  # (due, order set, timer), a heap
        self._live: set[str] = set()  # ids of the timers pending (not fired, replaced nor cancelled)
        self._order = 0
        self._journals: dict[str, list[Any]] = defaultdict(list)  # a duplicate repeats its first actions
        self.journal: list[Any] = []  # every rule run decided, in order (Decision entries)

    def pending(self) -> int:
        """Timers set and not fired, replaced nor cancelled yet."""
        return len(self._live)

    def event(self, raw: Any) -> list[Step]:
        """Decide one input event (a dict or an EventIn): first the timers due by its time, then the event, then
        the events its rules sent (and the ones those sent)."""
        ev, _ = check_event(raw, self.now_ms)
        steps = self.until(ev.ts) if ev is not None else []
        steps += self._decide(raw, None)
        return steps

    def until(self, t_ms: int) -> list[Step]:
        """Fire every pending timer due by `t_ms` (event time), in due order, with what they make."""
        steps: list[Step] = []
        while self._timers and self._timers[0][0] <= t_ms:
            _, _, fired = heapq.heappop(self._timers)
            if fired.id in self._live:
                self._live.discard(fired.id)
                steps += self._decide(fired, "timer")
        return steps

    def finish(self, until_ms: int | None = None) -> list[Step]:
        """Fire the timers due by `until_ms`; by default by the last event's time plus the longest timer set."""
        if until_ms is None:
            if self.last_ts is None:
                return []
            until_ms = self.last_ts + self.longest_delay
        return self.until(until_ms)

    def _decide(self, first: Any, via: str | None) -> list[Step]:
        steps: list[Step] = []
        queue: deque[tuple[Any, str | None]] = deque([(first, via)])
        while queue:
            raw, how = queue.popleft()
            self.steps += 1
            if self.steps > self.max_steps:
                raise RuntimeError(f"dry run: more than {self.max_steps} events decided; rules fan out too much")
            if self.context is not None:
                self.engine.start_users([raw], self.context)
            out = self.engine.process([raw], self.now_ms)
            repeat_actions(out.results, out.earlier, self._journals)
            self.journal += out.journal
            for d in out.journal:
                self._journals[user_key(d["campaign"], d["user"])].append(d)
            for op, _key, tid, due, fired in out.timers:
                if op == "set":
                    assert fired is not None
                    self._order += 1
                    heapq.heappush(self._timers, (due, self._order, fired))
                    self._live.add(tid)
                    self.longest_delay = max(self.longest_delay, due - (_event_ts(raw, self.now_ms)))
                else:
                    self._live.discard(tid)
            result = out.results[0]
            ev, _ = check_event(raw, self.now_ms)
            step = Step(result)
            if ev is not None and result["status"] != "rejected":
                step.campaign, step.user = ev.campaign, ev.user
                step.context = self.engine.contexts([user_key(ev.campaign, ev.user)])[0]
                self.last_ts = ev.ts if self.last_ts is None else max(self.last_ts, ev.ts)
            if how is not None and isinstance(raw, EventIn):
                step.via = how
                step.event = {"user": raw.user, "type": raw.type, "ts": raw.ts, "cause": raw.cause,
                              "depth": raw.depth}
            if not (how == "timer" and result["status"] == "duplicate"):  # a timer replaced meanwhile: not shown
                steps.append(step)
            queue.extend((s, "send") for _, s in out.sends)
        return steps


def _event_ts(raw: Any, now_ms: int) -> int:
    """The event time of an event as the engine decides it."""
    ev, _ = check_event(raw, now_ms)
    return ev.ts if ev is not None else now_ms
