"""Typed schema of the playbus YAML: what each field is, its default and its limits."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "BatchConfig",
    "DurabilityConfig",
    "BudgetConfig",
    "CampaignConfig",
    "CapConfig",
    "Config",
    "FieldCheckError",
    "RuleConfig",
    "SandboxConfig",
    "TargetConfig",
    "TimersConfig",
    "campaign_document",
    "parse_duration",
]

_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$"
_CAP_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.:/\-]*$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds of a duration such as "500ms", "2s", "10m", "24h" or "7d"; ValueError otherwise."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError("expected a duration like '500ms', '2s', '10m', '24h' or '7d'")
    return float(m.group(1)) * _UNIT_S[m.group(2)]
_ACTION_TYPE = r"^[a-z0-9_]+(\.[A-Za-z0-9_\-]+)+$"
_EVENT_TYPE = r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$"


class FieldCheckError(ValueError):
    """A cross-field check's failure, naming the field it is about (`loc`, relative to the model checked)
    so that the loader can point at that field's line and value rather than at the enclosing mapping."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class BatchConfig(_Strict):
    """How shards cut the input into micro-batches (one Redis commit per batch). A batch whose rules have run
    for `max_decide_ms` leaves its remaining events to the next batch (slow rules delay, never fail, others)."""

    max_events: int = Field(default=500, ge=1, le=100_000)
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    max_decide_ms: float = Field(default=1_000.0, gt=0, le=600_000)


class TargetConfig(_Strict):
    """Where the actions of one gameplay go: a Redis stream or a webhook, exactly one of them.

    A webhook is retried with capped backoff until `retry_for` has passed since the action's first attempt
    (and, when `max_attempts` is set, at most that many attempts), then dead-lettered."""

    stream: str | None = Field(None, min_length=1, max_length=256)
    webhook: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    max_attempts: int | None = Field(None, ge=1, le=1_000_000)
    retry_for: str = "24h"
    timeout_s: float = Field(5.0, gt=0, le=300)
    headers: dict[str, str] = {}
    secret: str | None = Field(None, min_length=1, max_length=4096)

    @field_validator("retry_for")
    @classmethod
    def _duration(cls, v: str) -> str:
        seconds = parse_duration(v)
        if not 0 < seconds <= 30 * 86400:
            raise ValueError("expected a duration between 1ms and 30d")
        return v

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", name) or "\n" in value or "\r" in value:
                raise ValueError(f"header {name!r}: expected a token name and a one-line value")
            if name.lower() in ("content-type", "content-length", "idempotency-key", "x-playbus-signature", "host"):
                raise ValueError(f"header {name!r} is set by playbus")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetConfig:
        if (self.stream is None) == (self.webhook is None):
            raise ValueError("a target needs exactly one of 'stream' or 'webhook'")
        if self.stream is not None and (self.headers or self.secret):
            raise ValueError("'headers' and 'secret' are for webhook targets")
        return self

    @property
    def retry_for_s(self) -> float:
        return parse_duration(self.retry_for)


class SandboxConfig(_Strict):
    """Limits of the rules: instructions and memory of one run, a user's context, and how many runs in a row
    may fail their budget before the rule is disabled on that shard (until a new version is activated)."""

    max_instructions: int = Field(default=1_000_000, ge=1_000, le=1_000_000_000)
    max_memory_kb: int = Field(default=16_384, ge=256, le=1_048_576)
    max_context_kb: int = Field(default=64, ge=1, le=16_384)
    disable_after: int = Field(default=20, ge=1, le=1_000_000)


class TimersConfig(_Strict):
    """How shards fire the timers rules set with `later`: each shard looks for due timers every `poll_ms`
    (a timer fires at most about this late under normal load, plus a batch)."""

    poll_ms: float = Field(default=100.0, ge=1, le=60_000)


class RuleConfig(_Strict):
    """On an event type, run a Lua script that may emit the listed action types and make events of the `sends`
    types (for another user of the campaign with `send`, for this user later with `later`)."""

    id: str = Field(pattern=_NAME, max_length=128)
    on: str = Field(pattern=_EVENT_TYPE, max_length=128)
    script: str = Field(min_length=1)
    emits: tuple[str, ...] = ()
    sends: tuple[str, ...] = ()  # event types its `send` and `later` may make
    # Filled by the loader: the script's name (file stem) and source text (version 1).
    script_name: str = ""
    source: str = ""

    @field_validator("emits")
    @classmethod
    def _emits_are_action_types(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for i, t in enumerate(v):
            if not re.match(_ACTION_TYPE, t):
                raise FieldCheckError((i,), "expected an action type like 'lottery.grant_chance'")
        return v

    @field_validator("sends")
    @classmethod
    def _sends_are_event_types(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for i, t in enumerate(v):
            if not re.match(_EVENT_TYPE, t) or len(t) > 128:
                raise FieldCheckError((i,), "expected an event type like 'assist.credited'")
        return v


class CapConfig(_Strict):
    """At most `per_user` actions of one type per user per day, week or campaign (campaign time zone).

    Counters are kept under the cap's `id`: given, or derived from action, period and limit, so that adding,
    removing or reordering caps never mixes their counts up (a changed limit without an id is a new cap)."""

    id: str | None = Field(None, pattern=_CAP_ID, max_length=128)
    action: str = Field(pattern=_ACTION_TYPE)
    per_user: int = Field(ge=0)
    period: Literal["day", "week", "campaign"]

    @property
    def cap_id(self) -> str:
        """The cap's id: given, or derived from action, period and limit."""
        return self.id if self.id is not None else f"{self.action}/{self.period}/{self.per_user}"

    @property
    def key(self) -> str:
        """What counters are kept under: the id, and the period for a given id (days and weeks do not mix)."""
        return f"{self.id}@{self.period}" if self.id is not None else self.cap_id


class BudgetConfig(_Strict):
    """A campaign-wide total spent by the integer parameter `param` of every `action`."""

    name: str = Field(pattern=_NAME, max_length=64)
    action: str = Field(pattern=_ACTION_TYPE)
    param: str = Field(min_length=1, max_length=64)
    total: int = Field(ge=0)


class CampaignConfig(_Strict):
    """One campaign: its window, time zone, rules, caps and budgets."""

    id: str = Field(pattern=_NAME, max_length=128)
    timezone: str = "UTC"
    starts: datetime
    ends: datetime
    rules: tuple[RuleConfig, ...] = ()
    caps: tuple[CapConfig, ...] = ()
    budgets: tuple[BudgetConfig, ...] = ()

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}; expected an IANA name like 'Asia/Shanghai'") from None
        return v

    @field_validator("starts", "ends")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("expected a time with a UTC offset, like 2026-01-20T00:00:00+08:00")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CampaignConfig:
        if self.ends <= self.starts:
            raise FieldCheckError(("ends",), f"must be after 'starts' ({self.starts.isoformat()})")
        seen: set[str] = set()
        for i, r in enumerate(self.rules):
            if r.id in seen:
                raise FieldCheckError(("rules", i, "id"), "rule ids must be unique within a campaign")
            seen.add(r.id)
        keys: set[str] = set()
        for i, c in enumerate(self.caps):
            if c.cap_id in keys:
                where = ("caps", i, "id") if c.id is not None else ("caps", i)
                raise FieldCheckError(where, f"two caps with the id {c.cap_id!r}; give one of them another 'id'")
            keys.add(c.cap_id)
        names: set[str] = set()
        for i, b in enumerate(self.budgets):
            if b.name in names:
                raise FieldCheckError(("budgets", i, "name"), "budget names must be unique within a campaign")
            names.add(b.name)
        return self

    @property
    def starts_ms(self) -> int:
        return int(self.starts.timestamp() * 1000)

    @property
    def ends_ms(self) -> int:
        return int(self.ends.timestamp() * 1000)


class DurabilityConfig(_Strict):
    """What `applied` waits for: the commit reaching Redis (`everysec`: the AOF is fsynced about every second)
    or the AOF fsync itself (`always`: WAITAOF on Redis 7.2+, `appendfsync always` required before that)."""

    fsync: Literal["everysec", "always"] = "everysec"


class Config(_Strict):
    """The whole playbus configuration file."""

    shards: int = Field(4, ge=1, le=1024)
    key_groups: int = Field(128, ge=1, le=65_536)
    # A user's event ids are remembered for `dedup_horizon` after they were received, and at least the last
    # `dedup_window` of them, at most `dedup_max_ids`: a retry inside that is answered `duplicate`.
    dedup_window: int = Field(32, ge=1, le=100_000)
    dedup_horizon: str = "10m"
    dedup_max_ids: int = Field(10_000, ge=1, le=1_000_000)
    durability: DurabilityConfig = DurabilityConfig()
    batch: BatchConfig = BatchConfig()
    timers: TimersConfig = TimersConfig()
    sandbox: SandboxConfig = SandboxConfig()
    targets: dict[str, TargetConfig] = {}
    campaigns: tuple[CampaignConfig, ...] = ()
    # Filled by the loader: the file it came from, for messages.
    source_file: str = ""

    @field_validator("dedup_horizon")
    @classmethod
    def _horizon(cls, v: str) -> str:
        if not 0 <= parse_duration(v) <= 7 * 86400:
            raise ValueError("expected a duration between 0s and 7d")
        return v

    @property
    def dedup_horizon_s(self) -> float:
        return parse_duration(self.dedup_horizon)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.dedup_max_ids < self.dedup_window:
            raise FieldCheckError(("dedup_max_ids",), f"must be at least dedup_window ({self.dedup_window})")
        if self.shards > self.key_groups:
            raise FieldCheckError(("shards",), f"expected at most key_groups ({self.key_groups}) shards")
        ids: set[str] = set()
        for i, c in enumerate(self.campaigns):
            if c.id in ids:
                raise FieldCheckError(("campaigns", i, "id"), "campaign ids must be unique")
            ids.add(c.id)
        return self

    def campaign(self, campaign_id: str) -> CampaignConfig | None:
        for c in self.campaigns:
            if c.id == campaign_id:
                return c
        return None


def campaign_document(c: CampaignConfig) -> dict[str, Any]:
    """A campaign as data, the shape of one `campaigns` item with its rules' scripts by name (what the admin API
    shows and takes, and what Redis keeps as the running configuration)."""
    return {
        "id": c.id, "timezone": c.timezone, "starts": c.starts.isoformat(), "ends": c.ends.isoformat(),
        "rules": [{"id": r.id, "on": r.on, "script": r.script_name or r.script, "emits": list(r.emits),
                   "sends": list(r.sends)} for r in c.rules],
        "caps": [{"id": cap.cap_id, "action": cap.action, "per_user": cap.per_user, "period": cap.period}
                 for cap in c.caps],
        "budgets": [{"name": b.name, "action": b.action, "param": b.param, "total": b.total} for b in c.budgets],
    }
