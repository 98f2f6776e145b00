"""Per-user caps on actions per day, week or campaign, counted in the user's state."""

from __future__ import annotations

from playbus.config.schema import CapConfig

__all__ = ["KEEP_PERIODS", "CapBook"]

KEEP_PERIODS = 8  # recent periods counted per cap and user; an event older than all of them is refused


class CapBook:
    """The caps of one campaign, indexed by action type.

    A user's counters are {cap id: {period key: count}}, the KEEP_PERIODS most recent periods, so that
    late or interleaved events of different days each count against their own day. An event for a period
    older than every one kept, once that many are kept, is refused: its count is no longer known, and a
    cap must never be exceeded.
    """

    def __init__(self, caps: tuple[CapConfig, ...]) -> None:
        self.by_action: dict[str, list[tuple[str, CapConfig]]] = {}
        self.by_position = [cap.key for cap in caps]  # for snapshots of version 1, which counted by position
        for cap in caps:
            self.by_action.setdefault(cap.action, []).append((cap.key, cap))
        self.ids = {cap.key: cap.cap_id for cap in caps}

    @staticmethod
    def _period(cap: CapConfig, day: int) -> int:
        if cap.period == "day":
            return day
        if cap.period == "week":
            return (day + 3) // 7
        return 0

    def refusal(self, counters: dict[str, dict[int, int]] | None, action: str, day: int) -> str:
        """Why one more `action` would exceed a cap, or "" when it fits."""
        for i, cap in self.by_action.get(action, ()):
            periods = counters.get(i) if counters else None
            period = self._period(cap, day)
            used = periods.get(period, 0) if periods else 0
            if used >= cap.per_user:
                return f"cap:{self.ids[i]}: at most {cap.per_user} {action} per user per {cap.period}"
            if periods and period not in periods and len(periods) >= KEEP_PERIODS and period < min(periods):
                return f"cap:{self.ids[i]}: {action} for a {cap.period} older than the {KEEP_PERIODS} counted"
        return ""

    def count(self, counters: dict[str, dict[int, int]], action: str, day: int) -> None:
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

    def migrate(self, counters: dict[object, dict[int, int]]) -> dict[str, dict[int, int]]:
        """Counters of a version 1 snapshot (keyed by the cap's position) keyed by cap id."""
        out: dict[str, dict[int, int]] = {}
        for k, periods in counters.items():
            if isinstance(k, int):
                if 0 <= k < len(self.by_position):
                    out[self.by_position[k]] = periods
            else:
                out[str(k)] = periods
        return out
