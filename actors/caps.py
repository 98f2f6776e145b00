"""Per-user caps on actions per day, week or campaign, counted in the user's state."""

from __future__ import annotations

from config.schema import CapConfig

__all__ = ["CapBook"]


class CapBook:
    """The caps of one campaign, indexed by action type.

    A user's counters are a dict {cap index: [period key, count]}; a new period starts the count at 0.
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

    def refusal(self, counters: dict[int, list[int]] | None, action: str, day: int) -> str:
        """Why one more `action` would exceed a cap, or "" when it fits."""
        for i, cap in self.by_action.get(action, ()):
            c = counters.get(i) if counters else None
            used = c[1] if c is not None and c[0] == self._period(cap, day) else 0
            if used >= cap.per_user:
                return f"cap: at most {cap.per_user} {action} per user per {cap.period}"
        return ""

    def count(self, counters: dict[int, list[int]], action: str, day: int) -> None:
        """Count one granted `action` against every cap on it."""
        for i, cap in self.by_action.get(action, ()):
            period = self._period(cap, day)
            c = counters.get(i)
            if c is None or c[0] != period:
                counters[i] = [period, 1]
            else:
                c[1] += 1
