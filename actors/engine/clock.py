"""Calendar of a campaign: the local day and week of an event time, cached per quarter hour."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

__all__ = ["CampaignClock"]

_DAY_MS = 86_400_000
_SLOT_MS = 900_000  # time-zone offsets change only on quarter-hour boundaries


class CampaignClock:
    """Maps an event time (ms since epoch) to days since 1970-01-01 in the campaign's time zone."""

    def __init__(self, tz: str) -> None:
        self._zone = ZoneInfo(tz)
        self.offsets: dict[int, int] = {}

    def offset_ms(self, ts: int) -> int:
        slot = ts // _SLOT_MS
        off = self.offsets.get(slot)
        if off is None:
            dt = datetime.fromtimestamp(slot * _SLOT_MS / 1000, tz=timezone.utc).astimezone(self._zone)
            delta = dt.utcoffset()
            off = int(delta.total_seconds() * 1000) if delta is not None else 0
            if len(self.offsets) > 100_000:
                self.offsets.clear()
            self.offsets[slot] = off
        return off

    def day(self, ts: int) -> int:
        """Local day number: days since 1970-01-01 in the campaign's zone."""
        off = self.offsets.get(ts // _SLOT_MS)
        if off is None:
            off = self.offset_ms(ts)
        return (ts + off) // _DAY_MS

    @staticmethod
    def week(day: int) -> int:
        """Week number (weeks start on Monday) of a local day number; 1970-01-01 was a Thursday."""
        return (day + 3) // 7
