"""A script cannot hurt others: nothing it keeps between runs (module-level tables, locals, global tables) survives
a run, so memory cannot grow and decisions never depend on history; a rule that keeps failing its budget is
disabled in its sandbox; a user's context is capped; and a batch's slow rules delay, never fail, the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from playbus.actors.engine.engine import ShardEngine
from tests.support.configs import T0, ev, make_engine
from tests.unit.test_sandbox import DAY, TS, Box, assert_clean

HOARD = """
local kept = {}
function decide(e, ctx)
  kept[#kept + 1] = string.rep("x", 200000)
  ctx:set("kept", #kept)
end
"""
COUNTER = """
local count, label = 0, "start"
function decide(e, ctx)
  count = count + 1
  label = label .. "!"
  ctx:set("count", count)
  ctx:set("label", label)
end
"""
GLOBAL_TABLE = """
STATE = {n = 0}
function decide(e, ctx)
  STATE.n = STATE.n + 1
  ctx:set("n", STATE.n)
end
"""
HELPER_WITH_STATE = """
local cache = {}
local function remember(k) cache[k] = (cache[k] or 0) + 1; return cache[k] end
function decide(e, ctx) ctx:set("seen", remember(e.user)) end
"""
LOOKUP = """
local CASH = {100, 300, 1000}
function decide(e, ctx) ctx:set("cash", CASH[2]) end
"""


def run_events(box: Box, rs: int, n: int, user_prefix: bytes = b"u") -> list[list[Any]]:
    cols: list[Any] = []
    for i in range(n):
        user = user_prefix + b"%d" % i
        cols += [b"e%d" % i, user, TS, DAY, False, box.slot(user), rs, 0]
    return box.sb.run_batch(cols, n, n * box.sizes[rs])


def test_a_script_hoarding_in_a_module_level_table_keeps_nothing_between_runs() -> None:
    box = Box(max_memory_kb=4096)
    rs = box.ruleset(HOARD)
    before = box.sb.memory_kb()
    for batch in range(8):  # the case: 29 -> 230 MB in 8 batches
        records = run_events(box, rs, 50, b"b%d-" % batch)
        assert [r[0] for r in records] == [None] * 50
        assert {r[1]["kept"] for r in records} == {1}  # every run starts from the module as loaded
    assert box.sb.memory_kb() - before < 2048  # the contexts of 400 users; nothing kept by the script
    assert_clean(box)


def test_module_level_locals_a_run_changes_are_put_back() -> None:
    box = Box()
    rs = box.ruleset(COUNTER)
    records = run_events(box, rs, 5)
    assert [r[1] for r in records] == [{"count": 1, "label": "start!"}] * 5


def test_global_tables_and_helpers_with_state_start_fresh_for_every_run() -> None:
    box = Box()
    for source, key in ((GLOBAL_TABLE, "n"), (HELPER_WITH_STATE, "seen")):
        rs = box.ruleset(source)
        assert [r[1][key] for r in run_events(box, rs, 4)] == [1, 1, 1, 1]


def test_a_script_with_only_constant_tables_still_reads_them() -> None:
    box = Box()
    rs = box.ruleset(LOOKUP)
    assert [r[1] for r in run_events(box, rs, 3)] == [{"cash": 300}] * 3


def test_a_hoarder_beside_an_honest_rule_leaves_it_and_the_sandbox_s_memory_alone() -> None:
    box = Box(max_memory_kb=2048)
    greedy = 'local t = {} function decide(e, ctx) for i = 1, 30 do t[#t + 1] = ("y"):rep(60000) end end'
    honest = 'function decide(e, ctx) local s = ("h"):rep(500000) ctx:incr("honest", #s // 500000) end'
    rs = box.ruleset(greedy, honest)
    before = box.sb.memory_kb()
    for batch in range(5):
        records = run_events(box, rs, 40, b"h%d-" % batch)
        assert all(r[0] is None and r[1] == {"honest": 1} for r in records[1::2])
    assert box.sb.memory_kb() - before < 4096  # 200 greedy runs of 1.8 MB each kept nothing
    assert_clean(box)


def test_a_rule_that_keeps_failing_its_budget_is_disabled_until_a_new_version() -> None:
    box = Box(max_instructions=10_000)
    box.sb = type(box.sb)(10_000, 16_384, disable_after=3)
    loop = box.sb.compile("loop", "function decide(e, ctx) while true do end end")
    rule = box.sb.define_rule("looper", loop, [], {})
    rs = box.sb.define_ruleset([rule], "c1", "quiz")
    box.sizes[rs] = 1
    errors = [r[0] for r in run_events(box, rs, 5)]
    assert errors[:3] == ["instruction budget exceeded"] * 3
    assert errors[3].startswith("rule disabled on this shard: 3 runs in a row failed their budget")
    assert box.sb.disabled_rules() == [("looper", errors[3])]
    fixed = box.sb.compile("loop", 'function decide(e, ctx) ctx:set("fixed", true) end', 2)
    box.sb.set_rule_script(rule, fixed)
    assert box.sb.disabled_rules() == []
    assert [r[1] for r in run_events(box, rs, 2, b"v")] == [{"fixed": True}] * 2


def test_a_user_s_context_is_capped_and_a_run_that_would_pass_the_cap_fails_alone() -> None:
    box = Box()
    box.sb = type(box.sb)(200_000, 16_384, max_context_kb=16)
    grow = box.sb.compile("grow", 'function decide(e, ctx) ctx:set("k" .. e.id, ("z"):rep(3000)) end')
    count = box.sb.compile("count", 'function decide(e, ctx) ctx:incr("n", 1) end')
    rs = box.sb.define_ruleset([box.sb.define_rule("grow", grow, [], {}), box.sb.define_rule("count", count, [], {})],
                                 "c1", "quiz")
    box.sizes[rs] = 2
    cols: list[Any] = []
    for i in range(8):
        cols += [b"%d" % i, b"u1", TS, DAY, False, box.slot(b"u1"), rs, 0]
    records = box.sb.run_batch(cols, 8, 16)
    grows, counts = records[0::2], records[1::2]
    assert [r[0] is None for r in grows] == [True] * 5 + [False] * 3
    assert all("the user's context would be" in r[0] and "over the limit of 16384" in r[0] for r in grows[5:])
    assert [r[1] for r in counts] == [{"n": i} for i in range(1, 9)]  # small writes still fit
    ctx = box.contexts([b"u1"])[0]
    assert ctx is not None and len(ctx) == 6  # 5 strings and the counter


SLOW = """
function decide(e, ctx)
  local x = 0
  for i = 1, 150000 do x = x + i end
  ctx:incr("slow", 1)
end
"""


def test_a_batch_whose_rules_use_up_its_time_defers_the_rest_untouched(tmp_path: Path) -> None:
    eng: ShardEngine = make_engine(tmp_path, {"slow": SLOW}, [{"id": "slow", "on": "quiz.answered", "script": "slow"}])
    events = [ev(i, user=f"u{i % 7}") for i in range(600)]
    out = eng.process(events, T0, max_seconds=0.05)
    assert 0 < out.deferred < 600 and len(out.results) == 600 - out.deferred
    done = len(out.results)
    assert all(r["status"] == "applied" and not r["errors"] for r in out.results)
    rest = eng.process(events[done:], T0)  # the deferred events, decided in a later batch, as if never seen
    assert all(r["status"] == "applied" for r in rest.results)
    straight = make_engine(tmp_path, {"slow": SLOW}, [{"id": "slow", "on": "quiz.answered", "script": "slow"}])
    straight.process(events, T0)
    keys = sorted(straight.users)
    assert eng.contexts(keys) == straight.contexts(keys)  # the same decisions as one undeferred batch


def test_activating_the_version_a_disabled_rule_already_runs_keeps_it_disabled(tmp_path: Path) -> None:
    loop = "function decide(e, ctx) while true do end end"
    eng: ShardEngine = make_engine(tmp_path, {"loop": loop}, [{"id": "loop", "on": "quiz.answered", "script": "loop"}],
                                   sandbox={"max_instructions": 10_000, "disable_after": 2})
    eng.process([ev(i, user=f"u{i}") for i in range(3)], T0)
    assert [r for r, _ in eng.sandbox.disabled_rules()] == ["loop"]
    eng.activate("loop", 1)  # a reconcile with the catalog re-activates what is already active
    assert [r for r, _ in eng.sandbox.disabled_rules()] == ["loop"]
    eng.put_script("loop", "function decide(e, ctx) ctx:set('ok', true) end", 2)
    eng.activate("loop", 2)
    assert eng.sandbox.disabled_rules() == []
    assert eng.process([ev(9)], T0).results[0]["errors"] == []


def test_writes_a_script_caught_errors_around_are_recorded_exactly_and_never_leak_into_the_next_run() -> None:
    """A run's writes sit in an overlay that the next run reuses: what a caught error refused is not in it, and
    what a failed run wrote is gone before the next run starts (in the same batch, for another user)."""
    box = Box()
    rs = box.ruleset(
        # 300 writes, the last 44 refused (256 keys per run) with the error caught: the 256 land.
        'function decide(e, ctx) if e.user == "many" then for i = 1, 300 do pcall(ctx.set, ctx, "k" .. i, i) end end '
        # A refused incr of a string, caught: only the set lands.
        'if e.user == "caught" then ctx:set("s", "x"); pcall(ctx.incr, ctx, "s", 1) end '
        # Writes, then fails: nothing lands.
        'if e.user == "fails" then ctx:set("a", 1); ctx:incr("b", 1); error("boom") end '
        # Writes once, after the failed run, in the same batch.
        'if e.user == "after" then ctx:set("c", 3) end end')
    cols: list[Any] = []
    for i, user in enumerate((b"many", b"caught", b"fails", b"after")):
        cols += [b"x%d" % i, user, TS, DAY, False, box.slot(user), rs, 0]
    many, caught, fails, after = box.sb.run_batch(cols, 4, 4)
    assert many[0] is None and many[1] == {f"k{i}": i for i in range(1, 257)}
    assert caught == [None, {"s": "x"}, None]
    assert fails[0].endswith("boom") and fails[1] is None
    assert after == [None, {"c": 3}, None]
    assert box.contexts([b"fails", b"after", b"caught"]) == [{}, {"c": 3}, {"s": "x"}]
