"""Properties of the engine over arbitrary event sequences (hypothesis)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from playbus.actors.engine.decisions import repeat_actions
from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.keys import user_key
from tests.support.configs import T0, make_config

SCRIPT = """
function decide(e, ctx)
  local n = ctx:incr("n", 1)
  if e.data.fail then error("asked to fail") end
  ctx:set("last", e.id)
  if random() < 0.8 then emit("lottery.grant_chance", {chances = random(3), n = n}) end
end
"""
CAPS = [
    {"action": "lottery.grant_chance", "per_user": 2, "period": "day"},
    {"action": "lottery.grant_chance", "per_user": 5, "period": "week"},
]
DAY = 86_400_000

events_st = st.lists(
    st.builds(
        lambda i, u, d, fail: {"id": f"e{i}", "campaign": "c1", "user": f"u{u}", "type": "quiz.answered",
                               "ts": T0 + d * DAY // 3, "data": {"fail": fail}},
        st.integers(0, 40), st.integers(0, 3), st.integers(0, 20), st.booleans(),
    ),
    max_size=60,
)
cuts_st = st.lists(st.integers(1, 60), max_size=6)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _engine(tmp: Path) -> ShardEngine:
    cfg = make_config(tmp, {"s": SCRIPT}, [{"id": "r", "on": "quiz.answered", "script": "s",
                                              "emits": ["lottery.grant_chance"]}], caps=CAPS)
    return ShardEngine(cfg)


def _batches(events: list[dict[str, Any]], cuts: list[int]) -> list[list[dict[str, Any]]]:
    out, i = [], 0
    for c in cuts:
        out.append(events[i:i + c])
        i += c
    out.append(events[i:])
    return [b for b in out if b]


def _run(eng: ShardEngine, batches: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Process batch after batch as a shard does, duplicates of earlier batches answered from the journal."""
    results = []
    journals: dict[str, list[Any]] = defaultdict(list)
    for b in batches:
        out = eng.process(b, T0)
        repeat_actions(out.results, out.earlier, journals)
        for d in out.journal:
            journals[user_key(d["campaign"], d["user"])].append(d)
        results += out.results
    return results


def _contexts(eng: ShardEngine) -> dict[str, Any]:
    keys = sorted(eng.users)
    return dict(zip(keys, eng.contexts(keys), strict=False))


@SETTINGS
@given(events=events_st, cuts=cuts_st)
def test_same_events_give_same_results_ids_and_context_whatever_the_batching(
    tmp_path: Path, events: list[dict[str, Any]], cuts: list[int]
) -> None:
    a, b = _engine(tmp_path), _engine(tmp_path)
    ra = _run(a, [events])
    rb = _run(b, _batches(events, cuts))
    assert ra == rb
    assert _contexts(a) == _contexts(b)


@SETTINGS
@given(events=events_st, split=st.integers(0, 60))
def test_snapshot_restore_continue_equals_continuing(tmp_path: Path, events: list[dict[str, Any]], split: int) -> None:
    first, rest = events[:split], events[split:]
    straight = _engine(tmp_path)
    _run(straight, [first])
    expected = _run(straight, [rest])

    before = _engine(tmp_path)
    _run(before, [first])
    snap = before.snapshot(list(before.users))
    after = _engine(tmp_path)
    for key, blob in snap.items():
        after.restore(key, blob)
    assert _run(after, [rest]) == expected
    assert _contexts(after) == _contexts(straight)


@SETTINGS
@given(events=events_st, order=st.randoms(use_true_random=False), cuts=cuts_st)
def test_caps_are_never_exceeded_in_any_order(tmp_path: Path, events: list[dict[str, Any]], order: Any,
                                              cuts: list[int]) -> None:
    events = list(events)
    order.shuffle(events)
    eng = _engine(tmp_path)
    results = _run(eng, _batches(events, cuts))
    per_day: Counter[tuple[str, int]] = Counter()
    per_week: Counter[tuple[str, int]] = Counter()
    by_id: dict[str, dict[str, Any]] = {}
    for e in events:  # the first occurrence is the one applied; later ones are duplicates
        by_id.setdefault(e["id"] + e["user"], e)
    for r in results:
        if r["status"] != "applied":
            continue  # a duplicate repeats its first processing's actions: they were counted there
        for a in r["actions"]:
            ts = by_id[a["cause"] + a["user"]]["ts"]
            day = (ts + 8 * 3_600_000) // DAY
            per_day[(a["user"], day)] += 1
            per_week[(a["user"], (day + 3) // 7)] += 1
    assert all(n <= 2 for n in per_day.values())
    assert all(n <= 5 for n in per_week.values())
