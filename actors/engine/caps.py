"""Per-user caps on actions per day, week or campaign, counted in the user's state."""

from __future__ import annotations

from playbus.config.schema import CapConfig

__all__ = ["KEEP_PERIODS", "CapBook"]

KEEP_PERIODS = 8  # recent periods counted per cap and user; an event older than all of them is refused


class CapBook:
    """The caps of one campaign, indexed by action type.

    A user's counters are {cap index: {period key: count}}, the KEEP_PERIODS most recent periods, so that
    late or interleaved events of different days each count against their own day. An event for a period
    older than every one kept, once that many are kept, is refused: its count is no longer known, and a
    cap must never be exceeded.
    """

    def __init__(self, caps: tuple[CapConfig, ...]) -> None:
        self.by_action: dict[str, list[tuple[int, CapConfig]]] = {}
        for i, cap in enumerate(caps):
            self.by_action.setdefault(cap.action, []).append((i, cap))

    @staticmethod
    def _period(cap: CapConfig, day: int) -> int:
        if cap.period == "day":
            return day
        if cap.period == "week":
            return (day + 3) // 7
        return 0

    def refusal(self, counters: dict[int, dict[int, int]] | None, action: str, day: int) -> str:
        """Why one more `action` would exceed a cap, or "" when it fits."""
        for i, cap in self.by_action.get(action, ()):
            periods = counters.get(i) if counters else None
            period = self._period(cap, day)
            used = periods.get(period, 0) if periods else 0
            if used >= cap.per_user:
                return f"cap: at most {cap.per_user} {action} per user per {cap.period}"
            if periods and period not in periods and len(periods) >= KEEP_PERIODS and period < min(periods):
                return f"cap: {action} for a {cap.period} older than the {KEEP_PERIODS} counted"
        return ""

    def count(self, counters: dict[int, dict[int, int]], action: str, day: int) -> None:
        """Count one granted `action` against every cap on it."""
        for i, cap in self.by_action.get(action, ()):
            period = self._period(cap, day)
            periods = counters.get(i)
            if periods is None:
                counters[i] = {period: 1}
                continue
            periods[period] = periods.get(period, 0) + 1
            if len(periods) > KEEP_PERIODS:
                del periods[min(periods)]
