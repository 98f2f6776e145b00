"""Hostile decision scripts: one test per threat against the Lua sandbox.

Each test checks that the attack fails with a clear error recorded for that rule run (or a compile error),
and that the runtime is still clean afterwards: a normal rule run in the same Sandbox gives the right
result, and nothing the attack touched leaked to other rules.
"""

from __future__ import annotations

import math
import time
from datetime import date, timedelta
from typing import Any

import msgpack
import pytest

from playbus.scripting import BUDGET_ERROR, MEMORY_ERROR, STRIDE, Sandbox, ScriptCompileError
from playbus.scripting.sandbox import TIME_ERROR

TS = 1_767_225_600_123  # 2026-01-01T00:00:00.123Z
DAY = 20454  # 2026-01-01
SLOW = 2.0  # seconds any single attack batch may take

Record = list[Any]


class Box:
    """A Sandbox plus helpers to run scripts as rules on one event each."""

    def __init__(self, max_instructions: int = 200_000, max_memory_kb: int = 16_384) -> None:
        self.sb = Sandbox(max_instructions, max_memory_kb)
        self.sizes: dict[int, int] = {}  # rule set -> number of rules
        self.slots: dict[bytes, int] = {}  # user -> its context's slot (what the engine keeps in UserState)
        self._events = 0
        self._probes = 0

    def ruleset(self, *sources: str, emits: tuple[str, ...] = ("a.b",), name: str = "attack",
                sends: tuple[str, ...] = ()) -> int:
        """Compile each source as a rule r1, r2, ... of one rule set."""
        rules = []
        for i, source in enumerate(sources, 1):
            handle = self.sb.compile(name, source)
            rules.append(self.sb.define_rule(f"r{i}", handle, list(emits), {}, list(sends)))
        rs = self.sb.define_ruleset(rules, "c1", "quiz")
        self.sizes[rs] = len(rules)
        return rs

    def slot(self, user: bytes) -> int:
        if user not in self.slots:
            self.slots[user] = self.sb.new_slot()
        return self.slots[user]

    def contexts(self, users: list[bytes]) -> list[dict[str, Any] | None]:
        return self.sb.get_contexts([self.slots.get(u, 0) for u in users])

    def load(self, user: bytes, context: dict[str, Any]) -> None:
        self.sb.load_context(self.slot(user), context)

    def event(
        self, rs: int, *, eid: bytes | None = None, user: bytes = b"u1", ts: int = TS, day: int = DAY,
        data: Any = None, max_seconds: float = SLOW, depth: int = 0,
    ) -> list[Record]:
        """Run one event through the rule set; one record per rule, within `max_seconds`."""
        self._events += 1
        blob = msgpack.packb(data) if data is not None else False
        cols = [eid or b"e%d" % self._events, user, ts, day, blob, self.slot(user), rs, depth]
        assert len(cols) == STRIDE
        started = time.perf_counter()
        records = self.sb.run_batch(cols, 1, self.sizes[rs])
        elapsed = time.perf_counter() - started
        assert elapsed < max_seconds, f"the batch took {elapsed:.2f} s"
        return records

    def run(self, *sources: str, max_seconds: float = SLOW, **event: Any) -> list[Record]:
        return self.event(self.ruleset(*sources), max_seconds=max_seconds, **event)

    def context(self, user: bytes = b"u1") -> dict[str, Any] | None:
        return self.contexts([user])[0]


PROBE = """
function decide(e, ctx)
  local n = ctx:incr("probe.n", 1)
  local ok, err = pcall(error, "caught", 0)
  emit("probe.ok", {
    n = n, id = e.id, now = now(), today = today(), ok = ok, caught = err,
    text = ("ab"):upper() .. string.rep("x", 3) .. table.concat({1, 2}, ",") .. string.format("%03d", 7),
    found = (("hello world"):find("wor")), max = math.max(1, 5), len = #"four",
    absent = type(_G) .. type(python) .. type(os) .. type(string.dump) .. type(load),
  })
end
"""


def assert_clean(box: Box) -> None:
    """A normal rule run in the same Sandbox, on a new user, works and gives the right result."""
    box._probes += 1
    user = b"probe%d" % box._probes
    rs = box.ruleset(PROBE, emits=("probe.ok",), name="probe")
    records = box.event(rs, eid=b"probe-event", user=user, ts=TS, day=DAY, max_seconds=0.5)
    assert records == [[None, {"probe.n": 1}, [["probe.ok", {
        "n": 1, "id": "probe-event", "now": TS, "today": "2026-01-01", "ok": False, "caught": "caught",
        "text": "ABxxx1,2007", "found": 7, "max": 5, "len": 4, "absent": "nilnilnilnilnil",
    }]]]]
    assert box.context(user) == {"probe.n": 1}


def assert_failed(record: Record, error: str) -> None:
    """The rule run failed with exactly this error (or one ending with it), and proposed nothing."""
    err, changes, emits = record
    assert err is not None and (err == error or err.endswith(": " + error)), err
    assert changes is None and emits is None


@pytest.fixture
def box() -> Box:
    return Box()


# -- Python objects --------------------------------------------------------------------------------


def test_python_eval_is_unreachable(box: Box) -> None:
    (rec,) = box.run('function decide(e, ctx) return python.eval("__import__(\'os\').getpid()") end')
    assert_failed(rec, "attempt to index a nil value (global 'python')")
    assert_clean(box)


def test_python_builtins_is_unreachable(box: Box) -> None:
    (rec,) = box.run('function decide(e, ctx) return python.builtins.open("/etc/passwd") end')
    assert_failed(rec, "attempt to index a nil value (global 'python')")
    assert_clean(box)


def test_no_python_object_is_reachable_from_globals_or_event(box: Box) -> None:
    source = """
    local function kinds(t)
      local out = {}
      for k, v in pairs(t) do out[k] = type(v) end
      return out
    end
    function decide(e, ctx)
      emit("a.b", {
        env = kinds(_ENV), event = kinds(e), data = kinds(e.data), nested = kinds(e.data.b),
        python = type(python), G = type(_G), getattr = type(getattr), registry = type(debug),
        id_class = type(e.id.__class__), str_class = type(("").__class__), ctx_class = type(ctx.__class__),
        ctx_dict = type(ctx.__dict__), event_class = type(e.__class__), ctx_get = type(ctx.get),
        mt_ctx = getmetatable(ctx), mt_event = getmetatable(e), mt_string = getmetatable(""),
        mt_lib = getmetatable(string),
      })
    end
    """
    (rec,) = box.run(source, data={"a": 1, "b": {"c": "d", "e": [1, 2]}})
    assert rec == [None, None, [["a.b", {
        "env": {}, "event": {"id": "string", "type": "string", "user": "string", "campaign": "string",
                             "ts": "number", "data": "table"},
        "data": {"a": "number", "b": "table"}, "nested": {"c": "string", "e": "table"},
        "python": "nil", "G": "nil", "getattr": "nil", "registry": "nil", "id_class": "nil",
        "str_class": "nil", "ctx_class": "nil", "ctx_dict": "nil", "event_class": "nil", "ctx_get": "function",
        "mt_ctx": "locked", "mt_event": "locked", "mt_string": "locked", "mt_lib": "locked",
    }]]]
    # Trying to reach Python through a getattr-style lookup is an error, not a Python object.
    (rec,) = box.run('function decide(e, ctx) return getattr(e, "__class__") end')
    assert_failed(rec, "attempt to call a nil value (global 'getattr')")
    assert_clean(box)


# -- missing libraries -----------------------------------------------------------------------------


def test_package_loadlib_is_absent(box: Box) -> None:
    (rec,) = box.run('function decide(e, ctx) package.loadlib("libc.so.6", "system")("id") end')
    assert_failed(rec, "attempt to index a nil value (global 'package')")
    assert_clean(box)


def test_require_is_absent(box: Box) -> None:
    (rec,) = box.run('function decide(e, ctx) local os = require("os") os.exit(1) end')
    assert_failed(rec, "attempt to call a nil value (global 'require')")
    assert_clean(box)


def test_string_dump_and_binary_load_are_absent(box: Box) -> None:
    (dump, load) = box.run(
        "function decide(e, ctx) local code = string.dump(decide) end",
        'function decide(e, ctx) return load("\\27Lua", "x", "b") end',
    )
    assert_failed(dump, "attempt to call a nil value (field 'dump')")
    assert_failed(load, "attempt to call a nil value (global 'load')")
    with pytest.raises(ScriptCompileError) as info:  # not at load time either
        box.sb.compile("attack", "local f = string.dump(print)\nfunction decide(e, ctx) end")
    assert info.value.line == 1 and "attempt to call a nil value (field 'dump')" in str(info.value)
    assert_clean(box)


def test_load_loadstring_dofile_loadfile_are_absent(box: Box) -> None:
    records = box.run(
        'function decide(e, ctx) load("x = 1")() end',
        'function decide(e, ctx) loadstring("x = 1")() end',
        'function decide(e, ctx) dofile("/etc/passwd") end',
        'function decide(e, ctx) loadfile("/etc/passwd")() end',
    )
    for rec, name in zip(records, ["load", "loadstring", "dofile", "loadfile"], strict=True):
        assert_failed(rec, f"attempt to call a nil value (global '{name}')")
    assert_clean(box)


def test_debug_getregistry_and_sethook_are_absent(box: Box) -> None:
    registry, sethook = box.run(
        "function decide(e, ctx) local r = debug.getregistry() end",
        # If the hook could be removed, the loop after it would never end.
        "function decide(e, ctx) pcall(function() debug.sethook() end) while true do end end",
    )
    assert_failed(registry, "attempt to index a nil value (global 'debug')")
    assert sethook == [BUDGET_ERROR, None, None]
    assert_clean(box)


def test_os_exit_is_absent(box: Box) -> None:
    (rec,) = box.run("function decide(e, ctx) os.exit(0) end")
    assert_failed(rec, "attempt to index a nil value (global 'os')")
    assert_clean(box)


def test_os_execute_is_absent(box: Box) -> None:
    (rec,) = box.run('function decide(e, ctx) os.execute("touch /tmp/pwned") end')
    assert_failed(rec, "attempt to index a nil value (global 'os')")
    assert_clean(box)


def test_io_popen_is_absent(box: Box) -> None:
    (rec,) = box.run('function decide(e, ctx) io.popen("id"):read("a") end')
    assert_failed(rec, "attempt to index a nil value (global 'io')")
    assert_clean(box)


def test_collectgarbage_is_absent(box: Box) -> None:
    (rec,) = box.run('function decide(e, ctx) collectgarbage("stop") end')
    assert_failed(rec, "attempt to call a nil value (global 'collectgarbage')")
    assert_clean(box)


def test_coroutine_is_absent(box: Box) -> None:
    # Not offered: the count hook is per thread, and a coroutine could yield across the budget.
    (rec,) = box.run("function decide(e, ctx) coroutine.wrap(function() while true do end end)() end")
    assert_failed(rec, "attempt to index a nil value (global 'coroutine')")
    assert_clean(box)


# -- poisoning shared state ------------------------------------------------------------------------


def test_string_metatable_and_libraries_cannot_be_poisoned(box: Box) -> None:
    records = box.run(
        'function decide(e, ctx) getmetatable("").__index = {upper = function() return "pwned" end} end',
        'function decide(e, ctx) string.upper = function() return "pwned" end end',
        'function decide(e, ctx) rawset(string, "upper", function() return "pwned" end) end',
        "function decide(e, ctx) setmetatable(string, {}) end",
        'function decide(e, ctx) table.concat = nil end',
        'function decide(e, ctx) math.max = nil end',
    )
    assert_failed(records[0], "attempt to index a string value")
    assert_failed(records[1], "string is read-only")
    assert_failed(records[2], "attempt to call a nil value (global 'rawset')")
    assert_failed(records[3], "cannot change a protected metatable")
    assert_failed(records[4], "table is read-only")
    assert_failed(records[5], "math is read-only")
    with pytest.raises(ScriptCompileError) as info:  # nor while a script loads
        box.sb.compile("attack", "function decide(e, ctx) end\nstring.rep = nil")
    assert info.value.line == 2 and "string is read-only" in str(info.value)
    assert_clean(box)  # ("ab"):upper(), string.rep, table.concat and math.max still work


def test_ctx_and_emit_cannot_be_poisoned_for_other_rules(box: Box) -> None:
    shadow = """
    emit = function() end   -- a global of this script only
    function decide(e, ctx) emit("a.b", {}) end
    """
    victim = 'function decide(e, ctx) ctx:set("k", ctx:get("k") or "fresh") emit("a.b", {k = ctx:get("k")}) end'
    records = box.run(
        "function decide(e, ctx) ctx.get = function() return 'pwned' end end",
        "function decide(e, ctx) getmetatable(ctx).__index.get = function() return 'pwned' end end",
        "function decide(e, ctx) emit = function() end end",
        shadow,
        victim,
    )
    assert_failed(records[0], "ctx is read-only; use ctx:set")
    assert_failed(records[1], "attempt to index a nil value (field '__index')")  # the metatable is "locked"
    assert_failed(records[2], "cannot set global 'emit': keep state in ctx")
    assert records[3] == [None, None, None]  # its own emit is the no-op it defined
    assert records[4] == [None, {"k": "fresh"}, [["a.b", {"k": "fresh"}]]]
    assert_clean(box)


# -- instruction budget ----------------------------------------------------------------------------


def test_infinite_loop_exhausts_the_budget(box: Box) -> None:
    (rec,) = box.run("function decide(e, ctx) while true do end end")
    assert rec == [BUDGET_ERROR, None, None]
    assert_clean(box)


def test_pcall_cannot_swallow_the_budget(box: Box) -> None:
    (rec, after) = box.run(
        "function decide(e, ctx) ctx:set('k', 1) while true do pcall(function() while true do end end) end end",
        'function decide(e, ctx) emit("a.b", {k = ctx:get("k")}) end',
    )
    assert rec == [BUDGET_ERROR, None, None]
    assert after == [None, None, [["a.b", {}]]]  # the failed rule's write was discarded
    assert_clean(box)


def test_xpcall_with_a_looping_handler_is_stopped(box: Box) -> None:
    (from_hook, from_error) = box.run(
        # the budget error is raised in the hook, where Lua runs message handlers with hooks disabled
        "function decide(e, ctx) xpcall(function() while true do end end, function() while true do end end) end",
        'function decide(e, ctx) xpcall(error, function() while true do end end, "x") end',
    )
    assert from_hook == [BUDGET_ERROR, None, None]
    assert from_error == [BUDGET_ERROR, None, None]
    assert_clean(box)


def test_coroutine_loops_are_impossible(box: Box) -> None:
    (rec,) = box.run(
        "function decide(e, ctx) local co = coroutine.create(function() while true do end end) "
        "coroutine.resume(co) end"
    )
    assert_failed(rec, "attempt to index a nil value (global 'coroutine')")
    assert_clean(box)


def test_deep_recursion_fails_the_rule(box: Box) -> None:
    deep = Box(max_instructions=50_000_000, max_memory_kb=16_384)
    nontail, tail, through_c = deep.run(
        "local function f(n) return 1 + f(n + 1) end function decide(e, ctx) f(1) end",
        "local function f(n) return f(n + 1) end function decide(e, ctx) f(1) end",
        "function decide(e, ctx) local t = setmetatable({}, {__index = function(t, k) return t[k] end}) "
        "return t.x end",
        max_seconds=10.0,
    )
    assert nontail[0] in (MEMORY_ERROR,) or nontail[0].endswith("stack overflow"), nontail
    assert tail == [BUDGET_ERROR, None, None]  # constant stack: only the budget stops it
    assert through_c[0].endswith("C stack overflow"), through_c
    (small,) = box.run("local function f(n) return 1 + f(n + 1) end function decide(e, ctx) f(1) end")
    assert small == [BUDGET_ERROR, None, None]
    assert_clean(deep)
    assert_clean(box)


# -- memory ----------------------------------------------------------------------------------------


@pytest.fixture
def mem_box() -> Box:
    return Box(max_instructions=20_000_000, max_memory_kb=4096)


def test_table_growth_hits_the_memory_cap(mem_box: Box) -> None:
    (rec,) = mem_box.run("function decide(e, ctx) local t = {} local i = 0 "
                         "while true do i = i + 1 t[i] = {i, i, i, i} end end")
    assert rec == [MEMORY_ERROR, None, None]
    assert_clean(mem_box)


def test_string_doubling_hits_the_memory_cap(mem_box: Box, box: Box) -> None:
    (plain, caught) = mem_box.run(
        'function decide(e, ctx) local s = "x" while true do s = s .. s end end',
        # lupa's hard limit raises "not enough memory", which a pcall must not swallow either
        'function decide(e, ctx) while true do pcall(function() local s = "x" while true do s = s .. s end end) '
        "end end",
    )
    assert plain == [MEMORY_ERROR, None, None]
    assert caught == [MEMORY_ERROR, None, None]
    # Copying a big string costs one instruction: a loop of them is stopped by the CPU-time backstop.
    (copying,) = box.run('function decide(e, ctx) local s = ("x"):rep(1e5) for i = 1, 4 do s = s .. s end '
                         "while true do local t = s .. s end end")
    assert copying == [TIME_ERROR, None, None]
    assert_clean(mem_box)
    assert_clean(box)


def test_huge_string_rep_is_refused(box: Box) -> None:
    records = box.run(
        'function decide(e, ctx) local s = string.rep("x", 2^40) end',
        'function decide(e, ctx) local s = ("ab"):rep(1e6, ",") end',
        'function decide(e, ctx) local s = string.rep("", 2^40) end',  # used to loop 2^40 times in C
        'function decide(e, ctx) local s = string.rep(12345, "1e9") end',  # coerced arguments
        'function decide(e, ctx) while true do local s = ("x"):rep(1e6) end end',  # C work is charged
    )
    assert_failed(records[0], "string.rep: result of 1099511627776 bytes (1099511627776 repetitions) "
                              "exceeds 1048576")
    assert_failed(records[1], "string.rep: result of 2999999 bytes (1000000 repetitions) exceeds 1048576")
    assert_failed(records[2], "string.rep: result of 0 bytes (1099511627776 repetitions) exceeds 1048576")
    assert_failed(records[3], "string.rep: result of 5000000000 bytes (1000000000 repetitions) exceeds 1048576")
    assert records[4] == [BUDGET_ERROR, None, None]
    assert_clean(box)


def test_table_concat_of_many_large_strings_hits_the_memory_cap(mem_box: Box, box: Box) -> None:
    (rec,) = mem_box.run('function decide(e, ctx) local s, t = ("x"):rep(1e6), {} '
                         "for i = 1, 100 do t[i] = s end local r = table.concat(t) end")
    assert rec == [MEMORY_ERROR, None, None]
    (looped,) = box.run('function decide(e, ctx) local s = ("x"):rep(1e5) local t = {s, s, s, s} '
                        "while true do local r = table.concat(t) end end")
    assert looped == [BUDGET_ERROR, None, None]
    assert_clean(mem_box)


def test_c_loops_over_huge_counts_are_charged(box: Box) -> None:
    big_len = "setmetatable({}, {__len = function() return 2^40 end})"
    records = box.run(
        "function decide(e, ctx) table.move({}, 1, 1e12, 2) end",
        f"function decide(e, ctx) table.insert({big_len}, 1, 0) end",
        f"function decide(e, ctx) table.remove({big_len}, 1) end",
        "function decide(e, ctx) while true do pcall(unpack, {}, 1, 900000) end end",
        'function decide(e, ctx) local s = ("x"):rep(900000) while true do pcall(string.byte, s, 1, -1) end end',
    )
    assert records == [[BUDGET_ERROR, None, None]] * 5
    (normal,) = box.run(
        "function decide(e, ctx) local t = {3, 1, 2} table.insert(t, 4) table.insert(t, 1, 0) "
        'local r = table.remove(t, 2) table.sort(t) emit("a.b", {t = t, r = r, u = {unpack(t, 2, 3)}, '
        'b = {("abc"):byte(1, -1)}, m = table.move({1, 2, 3}, 1, 3, 2)}) end'
    )
    assert normal == [None, None, [["a.b", {"t": [0, 1, 2, 4], "r": 3, "u": [1, 2], "b": [97, 98, 99],
                                            "m": [1, 1, 2, 3]}]]]
    assert_clean(box)


# -- finalizers and error objects ------------------------------------------------------------------


def test_gc_finalizers_are_refused(box: Box) -> None:
    direct, late, closing = box.run(
        "function decide(e, ctx) setmetatable({}, {__gc = function() while true do end end}) end",
        # __gc added after setmetatable does not mark the object for finalization (Lua 5.4)
        "function decide(e, ctx) local mt = {} setmetatable({}, mt) mt.__gc = function() while true do end end end",
        # to-be-closed variables run their handler with the hook active
        "function decide(e, ctx) local x <close> = setmetatable({}, {__close = function() while true do end end}) "
        "end",
    )
    assert_failed(direct, "setmetatable: __gc is not allowed")
    assert late == [None, None, None]
    assert closing == [BUDGET_ERROR, None, None]
    started = time.perf_counter()
    box.sb.memory_kb()  # a full collection runs no script code
    assert time.perf_counter() - started < 0.5
    assert_clean(box)


def test_error_object_with_a_looping_tostring_is_not_called(box: Box) -> None:
    (rec,) = box.run("function decide(e, ctx) "
                     "error(setmetatable({}, {__tostring = function() while true do end end})) end")
    assert rec == ["error object of type table", None, None]
    assert_clean(box)


# -- patterns --------------------------------------------------------------------------------------


def test_catastrophic_pattern_backtracking_is_refused(box: Box) -> None:
    records = box.run(
        'function decide(e, ctx) local s = ("a"):rep(100000) local r = s:find(".-.-.-.-b") end',
        'function decide(e, ctx) local s = ("a"):rep(100000) local r = string.match(s, ".*.*.*b") end',
        'function decide(e, ctx) local s = ("a"):rep(100000) local r = s:gsub(".-b", "") end',
        'function decide(e, ctx) local s = ("("):rep(100000) local r = s:find("%b()") end',
        'function decide(e, ctx) local s = ("a"):rep(100000) local r = s:find(("a"):rep(5000) .. "b", 1, true) end',
        # allowed (~0.2 s per call), but a loop of them is stopped by the CPU-time backstop
        'function decide(e, ctx) local s = ("x"):rep(9000) while true do local r = s:find("x-y") end end',
    )
    assert_failed(records[0], "string.find: pattern with 4 repetitions on 100000 bytes is too costly")
    assert_failed(records[1], "string.match: pattern with 3 repetitions on 100000 bytes is too costly")
    assert_failed(records[2], "string.gsub: pattern with 1 repetitions on 100000 bytes is too costly")
    assert_failed(records[3], "string.find: pattern with 1 repetitions on 100000 bytes is too costly")
    assert_failed(records[4], "string.find: pattern of 5001 bytes on 100000 bytes is too costly")
    assert records[5] == [TIME_ERROR, None, None]
    (normal,) = box.run('function decide(e, ctx) local a, b = ("key=value"):match("^(%w+)=(%w+)$") '
                        'emit("a.b", {a = a, b = b, n = select(2, ("a,b,c"):gsub(",", ";"))}) end')
    assert normal == [None, None, [["a.b", {"a": "key", "b": "value", "n": 2}]]]
    assert_clean(box)


# -- context and emit values -----------------------------------------------------------------------


def test_huge_context_values_are_refused() -> None:
    box = Box(max_instructions=1_000_000)  # room for building a 1 MiB string
    box.load(b"u1", {"k": "before"})
    records = box.run(
        'function decide(e, ctx) ctx:set("k", ("x"):rep(1048576)) end',
        'function decide(e, ctx) local t = {} for i = 1, 20 do t = {t} end ctx:set("k", t) end',
        'function decide(e, ctx) local t = {} for i = 1, 1000 do t[i] = i end ctx:set("k", t) end',
        'function decide(e, ctx) ctx:set("k", function() end) end',
        'function decide(e, ctx) local t = {} t.self = t ctx:set("k", t) end',
        # 256 entries per value, but many keys: the whole run's result is bounded
        'function decide(e, ctx) local s, t = ("x"):rep(4096), {} for i = 1, 255 do t[i] = s end '
        'for k = 1, 64 do ctx:set("k" .. k, t) end end',
    )
    assert_failed(records[0], "ctx:set('k'): string of 1048576 bytes exceeds 4096")
    assert_failed(records[1], "ctx:set('k'): nested deeper than 8")
    assert_failed(records[2], "ctx:set('k'): more than 256 entries")
    assert_failed(records[3], "ctx:set('k'): a function cannot be stored (numbers, strings, booleans, tables only)")
    assert_failed(records[4], "ctx:set('k'): nested deeper than 8")
    assert_failed(records[5], "rule run writes and emits more than 65536 bytes")
    for rec in records:
        assert rec[0].startswith("attack:1: "), rec  # reported at the script's line, not the driver's
    assert box.context() == {"k": "before"}
    # Many runs just under the per-run bound: every one succeeds, whatever else the batch holds.
    rs = box.ruleset('function decide(e, ctx) local s, t = ("x"):rep(4000), {} for i = 1, 14 do t[i] = s end '
                     'ctx:set("k", t) end')
    n = 40
    cols: list[Any] = []
    for i in range(n):
        cols += [b"big%d" % i, b"big%d" % i, TS, DAY, False, box.slot(b"big%d" % i), rs, 0]
    errors = [rec[0] for rec in box.sb.run_batch(cols, n, n)]
    assert errors == [None] * n
    contexts = box.contexts([b"big%d" % i for i in range(n)])
    assert [len((c or {}).get("k", [])) for c in contexts] == [14] * n
    assert_clean(box)


def test_invalid_utf8_is_refused_in_ctx_and_emits(box: Box) -> None:
    records = box.run(
        'function decide(e, ctx) ctx:set("k", "\\xff\\xfe") end',
        'function decide(e, ctx) ctx:set("\\xff", 1) end',
        'function decide(e, ctx) ctx:set("k", {["\\xc3"] = 1}) end',
        'function decide(e, ctx) emit("a.b", {v = "\\xc3\\x28"}) end',
        "function decide(e, ctx) ctx:set('k', e.data.raw) end",
        'function decide(e, ctx) error("bad \\xff bytes") end',
        data={"raw": b"\xff\x00"},
    )
    assert_failed(records[0], "ctx:set('k'): strings must be valid UTF-8")
    assert_failed(records[1], "ctx:set: key must be a string of 1..128 bytes")
    assert_failed(records[2], "ctx:set('k'): table keys must be valid UTF-8 of at most 128 bytes")
    assert_failed(records[3], "emit('a.b'): strings must be valid UTF-8")
    assert_failed(records[4], "ctx:set('k'): strings must be valid UTF-8")
    assert_failed(records[5], "bad ? bytes")  # the error text itself is made valid
    assert box.context() == {}
    assert_clean(box)


def test_nan_and_infinities_are_refused(box: Box) -> None:
    records = box.run(
        'function decide(e, ctx) ctx:set("k", 0/0) end',
        'function decide(e, ctx) ctx:set("k", {1, {math.huge}}) end',
        'function decide(e, ctx) ctx:incr("k", -math.huge) end',
        'function decide(e, ctx) ctx:set("k", 1e308) ctx:incr("k", 1e308) end',
        'function decide(e, ctx) emit("a.b", {v = 0/0}) end',
    )
    assert_failed(records[0], "ctx:set('k'): NaN and infinities are not storable")
    assert_failed(records[1], "ctx:set('k'): NaN and infinities are not storable")
    assert_failed(records[2], "ctx:incr: 'by' must be a finite number")
    assert_failed(records[3], "ctx:incr: the result is not finite")
    assert_failed(records[4], "emit('a.b'): NaN and infinities are not storable")
    assert box.context() == {}
    (finite,) = box.run('function decide(e, ctx) ctx:set("k", 1e308) ctx:incr("k", -1e308) end')
    assert finite == [None, {"k": 0.0}, None]
    assert_clean(box)


def test_emit_of_a_type_not_in_the_rules_emits_is_refused(box: Box) -> None:
    (rec, numeric) = box.run('function decide(e, ctx) emit("wallet.credit", {amount = 1000000}) end',
                             "function decide(e, ctx) emit(42, {}) end")
    assert_failed(rec, "emit of 'wallet.credit' is not allowed for rule 'r1' (emits: a.b)")
    assert_failed(numeric, "emit of number is not allowed for rule 'r2' (emits: a.b)")
    assert_clean(box)


def test_emit_with_non_table_params_is_refused(box: Box) -> None:
    (text, func) = box.run('function decide(e, ctx) emit("a.b", "chances=1") end',
                           'function decide(e, ctx) emit("a.b", print or function() end) end')
    assert_failed(text, "emit: params must be a table")
    assert_failed(func, "emit: params must be a table")
    assert_clean(box)


def test_too_many_emits_are_refused(box: Box) -> None:
    (rec, at_limit) = box.run('function decide(e, ctx) for i = 1, 65 do emit("a.b", {i = i}) end end',
                              'function decide(e, ctx) for i = 1, 64 do emit("a.b", {i = i}) end end')
    assert_failed(rec, "emit: more than 64 actions in one rule run")
    assert at_limit[0] is None and len(at_limit[2]) == 64 and at_limit[2][-1] == ["a.b", {"i": 64}]
    assert_clean(box)


# -- atomicity and state ---------------------------------------------------------------------------


def test_writes_and_emits_of_a_failing_rule_are_discarded(box: Box) -> None:
    box.load(b"u1", {"k": 1})
    records = box.run(
        'function decide(e, ctx) ctx:set("k", 2) ctx:set("new", true) emit("a.b", {}) error("boom") end',
        'function decide(e, ctx) ctx:incr("k", 5) emit("a.b", {}) while true do end end',
        'function decide(e, ctx) local t = {1} ctx:set("t", t) t[2] = 2 emit("a.b", {k = ctx:get("k")}) end',
    )
    assert_failed(records[0], "boom")
    assert records[1] == [BUDGET_ERROR, None, None]
    # the next rule of the same event sees the context as it was; later mutation of `t` is not stored
    assert records[2] == [None, {"t": [1]}, [["a.b", {"k": 1}]]]
    assert box.context() == {"k": 1, "t": [1]}
    assert_clean(box)


def test_a_rule_cannot_keep_state_in_globals(box: Box) -> None:
    counter = "count = 0\nfunction decide(e, ctx) count = count + 1 emit('a.b', {n = count}) end"
    fresh = "function decide(e, ctx) seen = true end"
    reader = "function decide(e, ctx) emit('a.b', {count = count, seen = seen}) end"
    rs = box.ruleset(counter, fresh, reader)
    for _ in range(2):  # the same failure every time: nothing was kept
        counted, created, read = box.event(rs)
        assert_failed(counted, "cannot set global 'count': keep state in ctx")
        assert counted[0].startswith("attack:2: ")
        assert_failed(created, "cannot set global 'seen': keep state in ctx")
        assert read == [None, None, [["a.b", {}]]]  # another script's globals are not visible
    assert_clean(box)


# -- deterministic helpers -------------------------------------------------------------------------

RANDOM = 'function decide(e, ctx) emit("a.b", {random(), random(), random(), random(6), random(10, 20)}) end'


def test_random_is_seeded_by_the_event_id(box: Box) -> None:
    rs = box.ruleset(RANDOM, RANDOM)
    first = box.event(rs, eid=b"evt-1")
    again = box.event(rs, eid=b"evt-1")
    other = box.event(rs, eid=b"evt-2")
    elsewhere = Box()
    assert elsewhere.event(elsewhere.ruleset(RANDOM, RANDOM), eid=b"evt-1") == first
    assert again == first
    seq = first[0][2][0][1]
    assert other[0][2][0][1] != seq
    assert first[1][2][0][1] != seq  # the rule id is part of the seed too
    assert len(set(seq[:3])) == 3 and all(0.0 <= x < 1.0 for x in seq[:3])
    assert 1 <= seq[3] <= 6 and 10 <= seq[4] <= 20
    assert all(isinstance(x, int) for x in seq[3:])
    (rec,) = box.run("function decide(e, ctx) random(5, 1) end")
    assert_failed(rec, "random: interval is empty")
    assert_clean(box)


@pytest.mark.parametrize(
    ("day", "expected"),
    [(0, "1970-01-01"), (-1, "1969-12-31"), (11016, "2000-02-29"), (19782, "2024-02-29"),
     (20454, "2026-01-01"), (20818, "2026-12-31"), (20878, "2027-03-01"), (47540, "2100-02-28"),
     (47541, "2100-03-01")],
)
def test_today_is_the_civil_date_of_the_event_day(box: Box, day: int, expected: str) -> None:
    assert (date(1970, 1, 1) + timedelta(days=day)).isoformat() == expected
    (rec,) = box.run('function decide(e, ctx) emit("a.b", {d = today()}) end', day=day)
    assert rec == [None, None, [["a.b", {"d": expected}]]]


def test_now_is_the_event_ts(box: Box) -> None:
    (rec,) = box.run('function decide(e, ctx) emit("a.b", {now = now(), ts = e.ts, kind = math.type(now())}) end',
                     ts=1_767_312_000_456)
    assert rec == [None, None, [["a.b", {"now": 1_767_312_000_456, "ts": 1_767_312_000_456, "kind": "integer"}]]]
    assert not math.isnan(rec[2][0][1]["now"])
    assert_clean(box)


def test_event_is_read_only_and_fresh_for_every_rule_run(box: Box) -> None:
    """The event proxy is shared by all runs: writes are refused and data mutations do not carry over."""
    (rec,) = box.run('function decide(e, ctx) e.user = "someone else" end')
    assert_failed(rec, "event is read-only")
    (rec,) = box.run('function decide(e, ctx) e.data.a = 99; ctx:set("a", e.data.a) end', data={"a": 1})
    assert rec[0] is None and rec[1] == {"a": 99}
    (rec,) = box.run('function decide(e, ctx) ctx:set("a2", e.data.a) end', data={"a": 1})
    assert rec[1] == {"a2": 1}
    assert_clean(box)
