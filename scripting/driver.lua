-- playbus sandbox driver: trusted Lua that runs the operators' decision scripts.
-- Loaded once per LuaRuntime by scripting/sandbox.py. Scripts never see anything defined here except
-- through the allow-listed environment built by make_env and the ctx/emit/now/today/random helpers.
-- Every value crossing to Python is msgpack bytes, so no Python object ever reaches Lua.
local MAX_INSTR_HOOKS, MAX_MEM_KB, MAX_CPU_S, MAX_CTX_BYTES, DISABLE_AFTER = ...

local type, next, pairs, ipairs, select, error, pcall, xpcall = type, next, pairs, ipairs, select, error, pcall, xpcall
local tostring, tonumber, rawget, rawset, rawlen, rawequal = tostring, tonumber, rawget, rawset, rawlen, rawequal
local setmetatable, getmetatable, load = setmetatable, getmetatable, load
local collectgarbage = collectgarbage
-- A collection cycle starts when the heap has grown 20% (Lua's default: 100%, which lets it reach twice the live
-- data). Contexts are nearly all of the live data and everything else dies young: measured on 500,000 users of
-- 10 keys, 888 resident bytes a user instead of 1,285 (one process); make bench, with the engine's slot
-- change: 1,097 -> 789 B a user; about 4% of the engine's speed.
collectgarbage("incremental", 120, 100)
local clock = os.clock
local mtype, floor, huge, tointeger = math.type, math.floor, math.huge, math.tointeger
local schar, sbyte, ssub, spack, sunpack, sgsub, srep, sformat =
  string.char, string.byte, string.sub, string.pack, string.unpack, string.gsub, string.rep, string.format
local sfind, smatch, sgmatch = string.find, string.match, string.gmatch
local concat, tunpack, tmove, tsort = table.concat, table.unpack, table.move, table.sort
local ulen = utf8.len
local sethook, getinfo = debug.sethook, debug.getinfo
local getupvalue, setupvalue, upvalueid = debug.getupvalue, debug.setupvalue, debug.upvalueid

local BUDGET_ERR = "instruction budget exceeded"
local MEMORY_ERR = "memory cap exceeded"
local TIME_ERR = "cpu time limit exceeded"
local NOMEM = "not enough memory"   -- Lua's message when lupa's hard max_memory refuses an allocation
local MAX_STR = 4096          -- longest string value a context or action may hold
local MAX_REP = 1048576       -- longest string.rep result (and most repetitions)
local MAX_ENTRIES = 256       -- entries in one table value (all levels)
local MAX_DEPTH = 8           -- nesting of one table value
local MAX_WRITES = 256        -- distinct context keys one rule run may write
local MAX_EMITS = 64          -- actions one rule run may propose
local MAX_SENDS = 256         -- events one rule run may make with send and later (and timers it may cancel)
local MAX_CHAIN = 8           -- a run on an event of this chain depth may not send nor set timers
local MAX_USER = 256          -- longest user id (as events allow)
local MAX_DATA = 16384        -- the largest data of an event (msgpack, estimated from above)
local MAX_DELAY = 400 * 86400000   -- the longest later(): 400 days, in ms
local MAX_KEY = 128           -- longest context key
local MAX_RUN_BYTES = 65536   -- msgpack size (estimated from above) of one rule run's writes and emits
local PATTERN_COST = 1e8      -- len(subject) ^ (quantifiers + 1), or len(subject) * len(pattern), above this is refused
-- Work done inside C library functions is invisible to the count hook (it counts VM instructions only),
-- so the wrappers below charge it to the same budget, in hook periods of 1000 instructions:
-- (1000 instructions take ~2 us; string.rep of 1 MiB ~1.6 ms, table.sort of 1e5 integers ~30 ms)
local UNIT_PER_BYTE = 1 / 4096    -- a hook period per 4 KiB of string produced or scanned
local UNIT_PER_ELEM = 1 / 256     -- a hook period per 256 values pushed or moved (sort: n log2 n / 128)
local CLOCK_ABOVE = 1e4           -- pattern calls whose worst case exceeds this also check the CPU time

---------------------------------------------------------------------------------------------------
-- Instruction budget, memory cap and CPU-time backstop: one count hook on the main thread, re-armed per
-- rule run.
local steps, limit, exhausted, mem_start, mem_cap, deadline = 0, huge, false, 0, huge, huge
local run_guarded   -- defined below; the one trusted function the hook may interrupt mid-run

-- Fail the rule run in a way no pcall/xpcall can swallow (they rethrow while `exhausted` is set).
-- Not when the hook interrupted run_guarded itself, between its pcall returning and the limits being
-- lifted: the error would escape run_batch and fail the whole batch. (The function at stack `level` is
-- the one the hook interrupted, when called from the hook.)
local function exhaust(err, level)
  local f = getinfo(level or 3, "f")
  if f and f.func == run_guarded then return end
  exhausted = err
  error(err, 0)
end

-- Backstop for what no instruction count sees: single VM instructions on huge strings (`..`, `==`, `<`)
-- cost up to milliseconds each, and pattern matching is charged by an estimate. The deadline is started
-- lazily at the run's first check, from its second hook on (no clock call for the short runs that never
-- get there): `deadline` is `false` in a run before that, `huge` outside runs. CPU time is the process's
-- (all threads): a backstop only, far above what the instruction budget allows.
local function check_clock(level)
  local d = deadline
  if d ~= huge then
    if not d then deadline = clock() + MAX_CPU_S
    elseif clock() > d then exhaust(TIME_ERR, level) end
  end
end

local function hook()
  steps = steps + 1
  if steps > limit then exhaust(BUDGET_ERR) end
  if collectgarbage("count") - mem_start > mem_cap then
    collectgarbage("collect")
    if collectgarbage("count") - mem_start > mem_cap then exhaust(MEMORY_ERR) end
  end
  if steps > 1 then check_clock(4) end
end
-- The hook is set only while a script runs (run_guarded): with any hook set, Lua 5.4 routes every VM
-- instruction through its hook dispatcher, which made the driver's own code about twice as slow.

-- Charge C work (in hook periods) to the run's instruction budget.
local function charge(units)
  steps = steps + units
  if steps > limit then exhaust(BUDGET_ERR) end
end

-- pcall/xpcall that cannot swallow an exhausted budget, nor a refused allocation (lupa's hard limit):
-- a script catching "not enough memory" in a loop would otherwise keep allocating up to that limit.
local function rethrow(ok, ...)
  if exhausted then error(exhausted, 0) end
  if not ok and ... == NOMEM then exhaust(MEMORY_ERR) end
  return ok, ...
end
local function safe_pcall(f, ...) return rethrow(pcall(f, ...)) end
-- The message handler runs before the stack unwinds. When the error comes from the hook, Lua runs it with
-- hooks disabled (lua_State.allowhook is 0 inside a hook), so a looping handler would never be stopped:
-- once the budget is exhausted, the script's handler is not called at all.
local function safe_xpcall(f, h, ...)
  if type(h) ~= "function" then error("bad argument #2 to 'xpcall' (function expected)", 2) end
  return rethrow(xpcall(f, function(e)
    if exhausted then return exhausted end
    return h(e)
  end, ...))
end

---------------------------------------------------------------------------------------------------
-- msgpack: the only format that crosses to Python (results, contexts, event data).
local function enc(v, buf)
  local t = type(v)
  if t == "nil" then buf[#buf + 1] = "\xc0"
  elseif t == "boolean" then buf[#buf + 1] = v and "\xc3" or "\xc2"
  elseif t == "number" then
    if mtype(v) == "integer" then
      if v >= 0 and v < 128 then buf[#buf + 1] = schar(v)
      elseif v < 0 and v >= -32 then buf[#buf + 1] = schar(256 + v)
      else buf[#buf + 1] = spack(">Bi8", 0xd3, v) end
    else
      buf[#buf + 1] = spack(">Bd", 0xcb, v)
    end
  elseif t == "string" then
    local n = #v
    if n < 32 then buf[#buf + 1] = schar(0xa0 + n); buf[#buf + 1] = v
    elseif n < 256 then buf[#buf + 1] = spack(">Bs1", 0xd9, v)
    elseif n < 65536 then buf[#buf + 1] = spack(">Bs2", 0xda, v)
    else buf[#buf + 1] = spack(">Bs4", 0xdb, v) end
  elseif t == "table" then
    local n, count = rawlen(v), 0
    for _ in next, v do count = count + 1 end
    if n > 0 and n == count then
      buf[#buf + 1] = n < 16 and schar(0x90 + n) or spack(">BI4", 0xdd, n)
      for i = 1, n do enc(rawget(v, i), buf) end
    else
      buf[#buf + 1] = count < 16 and schar(0x80 + count) or spack(">BI4", 0xdf, count)
      for k, x in next, v do enc(k, buf); enc(x, buf) end
    end
  else
    error("cannot encode a " .. t, 0)
  end
end

local function dec(s, pos)
  local b = sbyte(s, pos)
  if b < 0x80 then return b, pos + 1 end
  if b >= 0xe0 then return b - 256, pos + 1 end
  if b >= 0xa0 and b < 0xc0 then local n = b - 0xa0; return ssub(s, pos + 1, pos + n), pos + 1 + n end
  local arr, map, n
  if b >= 0x90 and b < 0xa0 then arr, n, pos = true, b - 0x90, pos + 1
  elseif b >= 0x80 and b < 0x90 then map, n, pos = true, b - 0x80, pos + 1
  elseif b == 0xc0 then return nil, pos + 1
  elseif b == 0xc2 then return false, pos + 1
  elseif b == 0xc3 then return true, pos + 1
  elseif b == 0xcc then return sunpack(">I1", s, pos + 1)
  elseif b == 0xcd then return sunpack(">I2", s, pos + 1)
  elseif b == 0xce then return sunpack(">I4", s, pos + 1)
  elseif b == 0xcf then return sunpack(">i8", s, pos + 1)   -- uint64 above 2^63 wraps; producers never send those
  elseif b == 0xd0 then return sunpack(">i1", s, pos + 1)
  elseif b == 0xd1 then return sunpack(">i2", s, pos + 1)
  elseif b == 0xd2 then return sunpack(">i4", s, pos + 1)
  elseif b == 0xd3 then return sunpack(">i8", s, pos + 1)
  elseif b == 0xca then return sunpack(">f", s, pos + 1)
  elseif b == 0xcb then return sunpack(">d", s, pos + 1)
  elseif b == 0xd9 or b == 0xc4 then return sunpack(">s1", s, pos + 1)
  elseif b == 0xda or b == 0xc5 then return sunpack(">s2", s, pos + 1)
  elseif b == 0xdb or b == 0xc6 then return sunpack(">s4", s, pos + 1)
  elseif b == 0xdc then arr, n, pos = true, sunpack(">I2", s, pos + 1)
  elseif b == 0xdd then arr, n, pos = true, sunpack(">I4", s, pos + 1)
  elseif b == 0xde then map, n, pos = true, sunpack(">I2", s, pos + 1)
  elseif b == 0xdf then map, n, pos = true, sunpack(">I4", s, pos + 1)
  else error(sformat("unsupported msgpack byte 0x%02x", b), 0) end
  local t = {}
  if arr then
    for i = 1, n do t[i], pos = dec(s, pos) end
  else
    for _ = 1, n do
      local k, v
      k, pos = dec(s, pos)
      v, pos = dec(s, pos)
      if k ~= nil then t[k] = v end
    end
  end
  return t, pos
end

local function decode(s) return (dec(s, 1)) end

---------------------------------------------------------------------------------------------------
-- Values that scripts store or emit: copied (so later mutation cannot bypass a rule's atomicity) and
-- checked (plain data only, bounded), with raw access so no script metamethod runs here.
-- Also returns an upper bound of the value's msgpack size. Errors are reported at the script's call of
-- ctx:set/emit: `depth` frames of copy_value, then copy, then ctx_set/emit, then the script (depth + 3).
local function label(what, name)
  if name == nil then return what end
  return what .. "('" .. name .. "')"
end

local function copy_value(v, what, name, depth, budget)
  local t = type(v)
  if t == "string" then
    if #v > MAX_STR then error(sformat("%s: string of %d bytes exceeds %d", label(what, name), #v, MAX_STR), depth + 3) end
    if not ulen(v) then error(label(what, name) .. ": strings must be valid UTF-8", depth + 3) end
    return v, budget, 5 + #v
  elseif t == "number" then
    if v ~= v or v == huge or v == -huge then error(label(what, name) .. ": NaN and infinities are not storable", depth + 3) end
    return v, budget, 9
  elseif t == "boolean" or t == "nil" then
    return v, budget, 1
  elseif t == "table" then
    if depth > MAX_DEPTH then error(sformat("%s: nested deeper than %d", label(what, name), MAX_DEPTH), depth + 3) end
    local out, size = {}, 5
    for k, x in next, v do
      budget = budget - 1
      if budget < 0 then error(sformat("%s: more than %d entries", label(what, name), MAX_ENTRIES), depth + 3) end
      local kt = type(k)
      if not (kt == "string" or mtype(k) == "integer") then
        error(label(what, name) .. ": table keys must be strings or integers", depth + 3)
      end
      if kt == "string" and (#k > MAX_KEY or not ulen(k)) then
        error(label(what, name) .. ": table keys must be valid UTF-8 of at most " .. MAX_KEY .. " bytes", depth + 3)
      end
      local xsize
      out[k], budget, xsize = copy_value(x, what, name, depth + 1, budget)
      size = size + xsize + (kt == "string" and 5 + #k or 9)
    end
    return out, budget, size
  end
  error(sformat("%s: a %s cannot be stored (numbers, strings, booleans, tables only)", label(what, name), t), depth + 3)
end
local function copy(v, what, name)
  local t = type(v)
  if t == "number" and v == v and v ~= huge and v ~= -huge then return v, 9 end  -- the common case, inline
  local out, _, size = copy_value(v, what, name, 1, MAX_ENTRIES)
  return out, size
end

---------------------------------------------------------------------------------------------------
-- The state of the rule run in progress.
local CTX = {}            -- user slot (a small integer Python hands out) -> context table (authoritative, in memory)
local NILV = {}           -- overlay marker of a deleted key
-- The run's writes go to an overlay (one table reused by every run, emptied after it; `cur_writes` keys in it),
-- merged into the context when the run succeeds.
local OVER = {}
local cur_base, cur_over, cur_writes, cur_emits, cur_rule, cur_bytes = nil, OVER, 0, nil, nil, 0
local cur_blob, cur_ts, cur_day, cur_rng
local cur_depth, cur_sends = 0, 0

local function ctx_get(_, k)
  if type(k) ~= "string" then error("ctx:get: key must be a string", 2) end
  local v = cur_over[k]
  if v == nil then v = cur_base[k] elseif v == NILV then return nil end
  if type(v) == "table" then return (copy(v, "ctx:get", k)) end
  return v
end

-- Bound what one rule run hands back (MAX_ENTRIES is per value: 256 keys x 256 entries x 4 KiB strings
-- would otherwise make a single run's result 256 MiB and fail the whole batch in run_batch).
local RUN_BYTES_ERR = sformat("rule run writes and emits more than %d bytes", MAX_RUN_BYTES)

local NO_EMITS = {}
-- `cur_writes` is always the number of keys in the overlay (checked before anything changes), which the
-- record encoding relies on, even when a script catches one of these errors and goes on.
local function ctx_put(k, v, size)
  local over = cur_over
  local bytes = cur_bytes + 5 + #k + size
  if bytes > MAX_RUN_BYTES then error(RUN_BYTES_ERR, 3) end
  if over[k] == nil then
    local w = cur_writes + 1
    if w > MAX_WRITES then error(sformat("ctx: more than %d keys written in one rule run", MAX_WRITES), 3) end
    cur_writes = w
  end
  cur_bytes = bytes
  if v == nil then over[k] = NILV else over[k] = v end
end

-- Context keys already checked (a bounded cache: the same few keys are used by every rule run).
local KEY_OK, key_ok_n = {}, 0
local function key_ok(k)
  if KEY_OK[k] then return true end
  if type(k) ~= "string" or #k == 0 or #k > MAX_KEY or not ulen(k) then return false end
  if key_ok_n >= 4096 then KEY_OK, key_ok_n = {}, 0 end
  KEY_OK[k], key_ok_n = true, key_ok_n + 1
  return true
end

local function ctx_set(_, k, v)
  if not key_ok(k) then
    error(sformat("ctx:set: key must be a string of 1..%d bytes", MAX_KEY), 2)
  end
  local value, size = copy(v, "ctx:set", k)
  ctx_put(k, value, size)
end

-- The most frequent call of all: ctx_put inlined, and as few VM instructions as it takes (they run under the
-- count hook).
local function ctx_incr(_, k, by)
  if not KEY_OK[k] and not key_ok(k) then
    error(sformat("ctx:incr: key must be a string of 1..%d bytes", MAX_KEY), 2)
  end
  if by == nil then by = 1
  elseif type(by) ~= "number" or by - by ~= 0 then   -- NaN - NaN and inf - inf are NaN
    error("ctx:incr: 'by' must be a finite number", 2)
  end
  local over = cur_over
  local v = over[k]
  local new = v == nil
  if new then v = cur_base[k] elseif v == NILV then v = nil end
  if v == nil then v = 0
  elseif type(v) ~= "number" then error(sformat("ctx:incr: key '%s' holds a %s, not a number", k, type(v)), 2) end
  v = v + by
  if v - v ~= 0 then error("ctx:incr: the result is not finite", 2) end
  local bytes = cur_bytes + 14 + #k
  if bytes > MAX_RUN_BYTES then error(RUN_BYTES_ERR, 2) end
  if new then
    local w = cur_writes + 1
    if w > MAX_WRITES then error(sformat("ctx: more than %d keys written in one rule run", MAX_WRITES), 2) end
    cur_writes = w
  end
  cur_bytes = bytes
  over[k] = v
  return v
end

local LOCKED = "locked"

-- The event a script sees: one read-only proxy reused for every rule run (creating a table per run was
-- the largest fixed cost of a run). Reads go proxy -> EV (the current fields, reset before each run) ->
-- a loader that decodes `data` on first use, a fresh table per run so no rule sees another's mutations.
local EV = setmetatable({}, {
  __index = function(t, k)
    if k == "data" then
      local d = cur_blob and decode(cur_blob) or {}
      rawset(t, "data", d)
      return d
    end
  end,
})
local EVENT = setmetatable({}, {
  __index = EV,
  __newindex = function() error("event is read-only", 2) end,
  __pairs = function()
    local c = {id = EV.id, type = EV.type, user = EV.user, campaign = EV.campaign, ts = EV.ts, data = EV.data}
    return next, c, nil
  end,
  __metatable = LOCKED,
})

local ctx_methods = {get = ctx_get, set = ctx_set, incr = ctx_incr}
local CTXOBJ = setmetatable({}, {
  __index = ctx_methods,
  __newindex = function() error("ctx is read-only; use ctx:set", 2) end,
  __metatable = LOCKED,
})

local function emit(atype, params)
  if type(atype) ~= "string" or not cur_rule.emits[atype] then
    error(sformat("emit of %s is not allowed for rule '%s' (emits: %s)",
      type(atype) == "string" and ("'" .. atype .. "'") or type(atype), cur_rule.id, cur_rule.emits_text), 2)
  end
  if params == nil then params = {} end
  if type(params) ~= "table" then error("emit: params must be a table", 2) end
  local size
  params, size = copy(params, "emit", atype)
  local bps = cur_rule.budget_params[atype]
  if bps then
    for i = 1, #bps do
      local bp = bps[i]
      local a = params[bp]
      if mtype(a) ~= "integer" or a < 0 then
        error(sformat("emit('%s'): budget parameter '%s' must be a non-negative integer", atype, bp), 2)
      end
    end
  end
  if cur_emits == NO_EMITS then cur_emits = {} end
  local n = #cur_emits
  if n >= MAX_EMITS then error(sformat("emit: more than %d actions in one rule run", MAX_EMITS), 2) end
  cur_bytes = cur_bytes + 6 + #atype + size
  if cur_bytes > MAX_RUN_BYTES then error(RUN_BYTES_ERR, 2) end
  cur_emits[n + 1] = {atype, params}
end

-- Events a rule makes: for another user now (send) or for this user later (later, cancel). They travel in the
-- run's record with its emits, as arrays that actions ({type, params}) never are: {1, type, data, user},
-- {2, type, data, delay_ms, key or false}, {3, key}; Python turns them into events and timers once the run
-- succeeded (a failed run's are discarded with its writes and emits).
local function effect_slot(what)
  if cur_sends >= MAX_SENDS then
    error(sformat("%s: more than %d sends, timers and cancels in one rule run", what, MAX_SENDS), 3)
  end
  cur_sends = cur_sends + 1
  if cur_emits == NO_EMITS then cur_emits = {} end
  local n = #cur_emits
  if n >= MAX_EMITS + MAX_SENDS then error(sformat("%s: too many effects in one rule run", what), 3) end
  return n + 1
end

local function check_sendable(what, etype)
  if type(etype) ~= "string" or not cur_rule.sends[etype] then
    error(sformat("%s of %s is not allowed for rule '%s' (sends: %s)", what,
      type(etype) == "string" and ("'" .. etype .. "'") or type(etype), cur_rule.id, cur_rule.sends_text), 3)
  end
  if cur_depth >= MAX_CHAIN then
    error(sformat("%s: chain depth %d reached (event '%s' was itself made by rules %d times over)", what,
      MAX_CHAIN, EV.id, cur_depth), 3)
  end
end

local function event_data(what, etype, data)
  if data == nil then return {}, 1 end
  if type(data) ~= "table" then error(sformat("%s('%s'): data must be a table", what, etype), 3) end
  for k in next, data do
    if type(k) ~= "string" then error(sformat("%s('%s'): data keys must be strings", what, etype), 3) end
  end
  local value, size = copy(data, what, etype)
  if size > MAX_DATA then error(sformat("%s('%s'): data of about %d bytes, at most %d", what, etype, size, MAX_DATA), 3) end
  return value, size
end

local function send(user, etype, data)
  check_sendable("send", etype)
  if type(user) ~= "string" or #user == 0 or #user > MAX_USER or not ulen(user) then
    error(sformat("send('%s'): user must be a string of 1..%d bytes", etype, MAX_USER), 2)
  end
  local value, size = event_data("send", etype, data)
  local i = effect_slot("send")
  cur_bytes = cur_bytes + 10 + #etype + #user + size
  if cur_bytes > MAX_RUN_BYTES then error(RUN_BYTES_ERR, 2) end
  cur_emits[i] = {1, etype, value, user}
end

local function timer_key(what, key)
  if type(key) ~= "string" or #key == 0 or #key > MAX_KEY or not ulen(key) then
    error(sformat("%s: key must be a string of 1..%d bytes", what, MAX_KEY), 3)
  end
  return key
end

local function later(delay, etype, data, key)
  check_sendable("later", etype)
  if mtype(delay) ~= "integer" or delay < 0 or delay > MAX_DELAY then
    error(sformat("later('%s'): delay_ms must be an integer of 0..%d (400 days)", etype, MAX_DELAY), 2)
  end
  if key ~= nil then key = timer_key("later", key) else key = false end
  local value, size = event_data("later", etype, data)
  local i = effect_slot("later")
  cur_bytes = cur_bytes + 20 + #etype + (key and #key or 0) + size
  if cur_bytes > MAX_RUN_BYTES then error(RUN_BYTES_ERR, 2) end
  cur_emits[i] = {2, etype, value, delay, key}
end

local function cancel(key)
  key = timer_key("cancel", key)
  local i = effect_slot("cancel")
  cur_bytes = cur_bytes + 4 + #key
  if cur_bytes > MAX_RUN_BYTES then error(RUN_BYTES_ERR, 2) end
  cur_emits[i] = {3, key}
end

local function now() return cur_ts end

local function today()
  -- civil date of cur_day (days since 1970-01-01 in campaign time zone); Howard Hinnant's algorithm
  local z = cur_day + 719468
  local era = (z >= 0 and z or z - 146096) // 146097
  local doe = z - era * 146097
  local yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
  local mp = (5 * doy + 2) // 153
  local d = doy - (153 * mp + 2) // 5 + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return sformat("%04d-%02d-%02d", y, m, d)
end

local function rng_next()
  -- splitmix64 over a state seeded by FNV-1a of (event id, rule id)
  if cur_rng == nil then
    local h = -3750763034362895579   -- 0xcbf29ce484222325
    local s = EV.id .. "\0" .. cur_rule.id
    for i = 1, #s do h = (h ~ sbyte(s, i)) * 1099511628211 end
    cur_rng = h
  end
  cur_rng = cur_rng + -7046029254386353131   -- 0x9e3779b97f4a7c15
  local z = cur_rng
  z = (z ~ (z >> 30)) * -4658895280553007687
  z = (z ~ (z >> 27)) * -7723592293110705685
  z = z ~ (z >> 31)
  return (z >> 11) * (1.0 / 9007199254740992)
end

local function random(m, n)
  local r = rng_next()
  if m == nil then return r end
  if mtype(m) ~= "integer" or (n ~= nil and mtype(n) ~= "integer") then
    error("random: bounds must be integers", 2)
  end
  if n == nil then m, n = 1, m end
  if m > n then error("random: interval is empty", 2) end
  return m + floor(r * (n - m + 1))
end

---------------------------------------------------------------------------------------------------
-- The allow-listed environment. Library tables are read-only proxies shared by all scripts.
local function readonly(t, name)
  return setmetatable({}, {
    __index = t,
    __newindex = function() error(name .. " is read-only", 2) end,
    __metatable = LOCKED,
  })
end

-- C work charged after the call by the length of its string result (each single call is bounded by the
-- memory limits, so charging afterwards stops a loop of them).
local function charged_bytes(r, ...)
  if type(r) == "string" then charge(#r * UNIT_PER_BYTE) end
  return r, ...
end
local function by_bytes(f) return function(...) return charged_bytes(f(...)) end end

-- Pattern matching backtracks inside one C call, where no hook fires: refuse a call whose worst case is
-- too costly. Each quantifier and each %b (a scan to the end for its closing character) can multiply the
-- work by len(subject); each pattern byte (literal or in a [set]) is tried at every start position, also
-- in a plain find (a naive search: "aaa...a" in "aaa...ab" took seconds). The worst case is an upper
-- bound far above typical calls, so it is not charged: a call that may be slow checks the CPU time
-- instead (("x"):rep(9000):find("x-y") is allowed and takes ~0.2 s; a loop of them is stopped there).
local function check_pattern(fname, s, p, plain)
  if type(s) ~= "string" or type(p) ~= "string" then return end   -- numbers: a few bytes
  local ls = #s + 1
  local cost = ls * (#p + 1)
  if cost > PATTERN_COST then
    error(sformat("string.%s: pattern of %d bytes on %d bytes is too costly", fname, #p, #s), 3)
  end
  if not plain then
    local _, q = sgsub(p, "[%*%+%-%?]", "")
    if sfind(p, "%b", 1, true) then local _, nb = sgsub(p, "%%b", ""); q = q + nb end
    local worst = ls ^ (q + 1)
    if worst > PATTERN_COST then
      error(sformat("string.%s: pattern with %d repetitions on %d bytes is too costly", fname, q, #s), 3)
    end
    if worst > cost then cost = worst end
  end
  charge(ls * UNIT_PER_BYTE)
  if cost > CLOCK_ABOVE then check_clock(4) end
end

local safe_string = {}
for k, v in next, string do
  if k ~= "dump" then safe_string[k] = v end
end
local function slen(x)   -- the length Lua's own string coercion gives x
  if type(x) == "string" then return #x elseif type(x) == "number" then return #tostring(x) end
  return 0
end
safe_string.rep = function(s, n, sep)
  -- Coerced like string.rep does ("1e9" and 12345 are valid arguments), and the count is bounded too:
  -- rep("", 2^40) produces nothing but loops 2^40 times in C.
  local count = tonumber(n)
  if count and count > 0 then
    local size = slen(s) * count + slen(sep) * (count - 1)
    if count > MAX_REP or size > MAX_REP then
      error(sformat("string.rep: result of %.0f bytes (%.0f repetitions) exceeds %d", size, count, MAX_REP), 2)
    end
  end
  return charged_bytes(srep(s, n, sep))
end
safe_string.find = function(s, p, init, plain)
  check_pattern("find", s, p, plain)
  return sfind(s, p, init, plain)
end
safe_string.match = function(s, p, init)
  check_pattern("match", s, p)
  return smatch(s, p, init)
end
safe_string.gmatch = function(s, p, init)
  check_pattern("gmatch", s, p)
  return sgmatch(s, p, init)
end
safe_string.gsub = function(s, p, repl, n)
  check_pattern("gsub", s, p)
  return charged_bytes(sgsub(s, p, repl, n))
end
-- s:byte(1, -1) pushes up to a million values in one call: charge the span first (a wrapper that passes
-- them on would overflow the stack). i and j as string.byte/utf8.codepoint read them, clamped to s.
local function span(s, i, j)
  local l = slen(s)
  local from = tonumber(i) or 1
  local to = tonumber(j) or from
  if from < 0 then from = l + from + 1 end
  if to < 0 then to = l + to + 1 end
  if from < 1 then from = 1 end
  if to > l then to = l end
  if to >= from then charge((to - from + 1) * UNIT_PER_ELEM) end
end
safe_string.byte = function(s, i, j)
  span(s, i, j)
  return sbyte(s, i, j)
end
for _, k in ipairs({"char", "format", "lower", "pack", "reverse", "sub", "upper"}) do
  safe_string[k] = by_bytes(string[k])
end

local safe_utf8 = {}
for k, v in next, utf8 do safe_utf8[k] = v end
safe_utf8.char = by_bytes(utf8.char)
local ucodepoint = utf8.codepoint
safe_utf8.codepoint = function(s, i, j, lax)
  span(s, i, j)
  return ucodepoint(s, i, j, lax)
end
safe_utf8.len = function(s, ...)
  if type(s) == "string" then charge(#s * UNIT_PER_BYTE) end
  return ulen(s, ...)
end

local safe_table = {}
for k, v in next, table do safe_table[k] = v end
safe_table.concat = by_bytes(concat)
safe_table.unpack = function(t, i, j)
  -- Up to a million values in one call: charge them first, with #t read once (a __len metamethod could
  -- answer differently to the C function).
  if i == nil then i = 1 end
  if j == nil then j = #t end
  local from, to = tonumber(i), tonumber(j)
  if from and to and to >= from then charge((to - from + 1) * UNIT_PER_ELEM) end
  return tunpack(t, i, j)
end
local log = math.log
safe_table.sort = function(t, cmp)
  tsort(t, cmp)
  if type(t) == "table" then
    local n = rawlen(t)
    charge(n * log(n + 1, 2) / 128)
  end
end
safe_table.move = function(a1, f, e, t, a2)
  -- table.move(t, 1, 1e9, 2) loops 1e9 times in C, even on an empty table: charge the range first.
  local from, to = tonumber(f), tonumber(e)
  if from and to and to >= from then charge((to - from + 1) * UNIT_PER_ELEM) end
  return tmove(a1, f, e, t, a2)
end
-- table.insert/remove shift elements in a C loop bounded by #t, which a __len metamethod can make 2^40
-- (and return differently on each call): shift in Lua instead, where the count hook sees every step.
local function position(pos, fname)
  local p = tointeger(pos)
  if p == nil then error(sformat("bad argument #2 to '%s' (number has no integer representation)", fname), 3) end
  return p
end
safe_table.insert = function(t, ...)
  local nargs = select("#", ...)
  local e = #t + 1
  if nargs == 1 then
    t[e] = ...
    return
  elseif nargs ~= 2 then
    error("wrong number of arguments to 'insert'", 2)
  end
  local pos, v = ...
  pos = position(pos, "insert")
  if pos < 1 or pos > e then error("bad argument #2 to 'insert' (position out of bounds)", 2) end
  for i = e, pos + 1, -1 do t[i] = t[i - 1] end
  t[pos] = v
end
safe_table.remove = function(t, pos)
  local size = #t
  if pos == nil then pos = size else pos = position(pos, "remove") end
  if pos ~= size and (pos < 1 or pos > size + 1) then
    error("bad argument #2 to 'remove' (position out of bounds)", 2)
  end
  local v = t[pos]
  while pos < size do
    t[pos] = t[pos + 1]
    pos = pos + 1
  end
  t[pos] = nil
  return v
end

-- Method calls on strings ("x"):rep(...) go through the string metatable: point it at the guarded
-- functions and lock it, so no script can poison it for the others.
local string_mt = getmetatable("")
string_mt.__index = safe_string
string_mt.__metatable = LOCKED

local safe_math = {}
for k, v in next, math do
  if k ~= "random" and k ~= "randomseed" then safe_math[k] = v end
end

local function safe_setmetatable(t, mt)
  if type(t) ~= "table" then error("setmetatable: table expected", 2) end
  if mt ~= nil and type(mt) ~= "table" then error("setmetatable: metatable must be a table or nil", 2) end
  if mt ~= nil and rawget(mt, "__gc") ~= nil then error("setmetatable: __gc is not allowed", 2) end
  return setmetatable(t, mt)
end

local BASE = {
  string = readonly(safe_string, "string"), table = readonly(safe_table, "table"),
  math = readonly(safe_math, "math"), utf8 = readonly(safe_utf8, "utf8"),
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, select = select,
  tonumber = tonumber, tostring = tostring, type = type, rawequal = rawequal, rawget = rawget, rawlen = rawlen,
  pcall = safe_pcall, xpcall = safe_xpcall, setmetatable = safe_setmetatable, getmetatable = getmetatable,
  unpack = safe_table.unpack,
  emit = emit, send = send, later = later, cancel = cancel, now = now, today = today, random = random,
}
local BASE_MT = {__index = BASE, __metatable = LOCKED}


---------------------------------------------------------------------------------------------------
-- Scripts, rules and rule sets, addressed by small integers that Python hands out.
local SCRIPTS, RULES, RULESETS = {}, {}, {}
local context_fits  -- defined with run_batch, below

function run_guarded(f, a, b, c)
  steps, limit, exhausted, mem_start, mem_cap = 0, MAX_INSTR_HOOKS, false, collectgarbage("count"), MAX_MEM_KB
  deadline = false
  sethook(hook, "", 1000)
  local ok, err = pcall(f, a, b, c)
  sethook()
  limit, mem_cap, deadline = huge, huge, huge
  if not ok and err == NOMEM then exhausted = MEMORY_ERR end   -- lupa's hard limit: report it as the cap
  if exhausted then ok, err = false, exhausted; exhausted = false; collectgarbage("collect") end
  return ok, err
end

local function errtext(err)
  if type(err) == "string" then
    if #err > 1024 then err = ssub(err, 1, 1024) .. "..." end
    if not ulen(err) then err = sgsub(err, "[\x80-\xff]", "?") end
    return err
  end
  if type(err) == "number" or type(err) == "boolean" or err == nil then return "error: " .. tostring(err) end
  return "error object of type " .. type(err)
end

local API = {}

-- A script's module: its main chunk run with a fresh environment. Globals live in `defs`; `env` stays empty
-- so that every global assignment reaches __newindex, which allows definitions while the chunk loads and
-- refuses them afterwards.
local function instantiate(chunk, name)
  local defs = setmetatable({}, BASE_MT)
  local loading = true
  local env = setmetatable({}, {
    __index = defs,
    __newindex = function(_, k, v)
      if loading then rawset(defs, k, v)
      else error("cannot set global '" .. tostring(k) .. "': keep state in ctx", 2) end
    end,
    __metatable = LOCKED,
  })
  setupvalue(chunk, 1, env)
  chunk()
  loading = false
  local decide = rawget(defs, "decide")
  if type(decide) ~= "function" then
    error(name .. ": the script must define a global function decide(event, ctx)", 0)
  end
  return decide, defs
end

-- What a script could keep between runs: tables (and other mutable objects) reachable from its globals or from
-- the upvalues of its own functions make it "stateful", and it is instantiated anew for every run; scalar
-- upvalues (module-level locals holding numbers, strings, booleans) are noted, and put back after every run.
-- Either way a run starts from the module as loaded: a decision never depends on earlier runs, and memory a
-- script keeps between runs cannot grow.
local function module_state(defs, source_name)
  local seen, ids, watched, stateful = {}, {}, {}, false
  local function visit(f)
    if seen[f] then return end
    seen[f] = true
    local info = getinfo(f, "S")
    if info.what == "C" or info.source ~= source_name then return end   -- library code: not the script's
    local i = 1
    while true do
      local uname, v = getupvalue(f, i)
      if uname == nil then break end
      if uname ~= "_ENV" then
        local tv = type(v)
        if tv == "function" then visit(v)
        elseif tv == "table" or tv == "userdata" or tv == "thread" then stateful = true
        else
          local id = upvalueid(f, i)
          if not ids[id] then ids[id] = true; watched[#watched + 1] = {f, i, v} end
        end
      end
      i = i + 1
    end
  end
  for _, v in next, defs do
    local tv = type(v)
    if tv == "function" then visit(v)
    elseif tv == "table" or tv == "userdata" or tv == "thread" then stateful = true end
  end
  return stateful, watched
end

-- Put back the scalar module-level locals a run changed.
local function restore_watched(watched)
  for i = 1, #watched do
    local w = watched[i]
    local _, v = getupvalue(w[1], w[2])
    if not rawequal(v, w[3]) then setupvalue(w[1], w[2], w[3]) end
  end
end

-- A stateful script's run: a fresh module, then its decide (all under the run's budget).
local function run_fresh(script, ev, ctx)
  local decide = instantiate(script.chunk, script.name)
  return decide(ev, ctx)
end

-- Compile one script version: returns true, or false and the message (with "name:line:").
function API.compile(handle, name, source)
  local chunk, err = load(source, "=" .. name, "t", {})
  if not chunk then return false, err end
  local decide, defs
  local ok, err = run_guarded(function() decide, defs = instantiate(chunk, name) end)
  if not ok then return false, errtext(err) end
  local stateful, watched = module_state(defs, "=" .. name)
  SCRIPTS[handle] = {decide = decide, chunk = chunk, name = name, stateful = stateful, watched = watched}
  return true
end

local function type_set(blob)
  local set, names = {}, {}
  for _, t in ipairs(decode(blob)) do set[t] = true; names[#names + 1] = t end
  return set, #names > 0 and concat(names, ", ") or "none"
end

function API.define_rule(handle, id, script_handle, emits_blob, budget_blob, sends_blob)
  local emits, emits_text = type_set(emits_blob)
  local sends, sends_text = type_set(sends_blob)
  RULES[handle] = {
    id = id, script = script_handle, emits = emits, emits_text = emits_text, sends = sends, sends_text = sends_text,
    budget_params = decode(budget_blob), fails = 0, disabled = false,
  }
end

-- A new script version re-enables a rule that was disabled for failing its budget.
function API.set_rule_script(handle, script_handle)
  local r = RULES[handle]
  r.script, r.fails, r.disabled = script_handle, 0, false
end

-- A canary: users whose bucket (user_bucket, 0..9999) is below `bp` run `script_handle` instead of the rule's
-- script; script_handle 0 ends it.
function API.set_rule_canary(handle, script_handle, bp)
  local r = RULES[handle]
  if script_handle == 0 then r.canary, r.canary_bp = nil, 0
  else r.canary, r.canary_bp, r.fails, r.disabled = script_handle, bp, 0, false end
end

-- A user's canary bucket: FNV-1a (64 bits) of campaign .. "\0" .. user, shifted right once, modulo 10000. The
-- engine computes the same in Python (engine.canary_bucket) to record which version decided.
local function user_bucket(campaign, user)
  local h = -3750763034362895579   -- 0xcbf29ce484222325
  local s = campaign .. "\0" .. user
  for i = 1, #s do h = (h ~ sbyte(s, i)) * 1099511628211 end
  return (h >> 1) % 10000
end

-- The rules disabled on this runtime, as msgpack [[rule id, reason], ...].
function API.disabled_rules()
  local out = {}
  for _, r in next, RULES do
    if r.disabled then out[#out + 1] = {r.id, r.disabled} end
  end
  local b = {}
  enc(out, b)
  return concat(b)
end
function API.drop_script(handle) SCRIPTS[handle] = nil end

-- The rules one event type runs in one campaign, in order (the event's campaign and type are the set's).
function API.define_ruleset(handle, rules_blob, campaign, etype)
  local list = {}
  for i, r in ipairs(decode(rules_blob)) do list[i] = RULES[r] end
  RULESETS[handle] = {rules = list, n = #list, campaign = campaign, type = etype}
end

-- The size of a user's context is kept as an upper bound (what it was when loaded, plus the bytes of every
-- run's writes since); when a run's writes would take the bound over MAX_CTX_BYTES, the exact size of the
-- context with those writes is measured, and the run fails if that is over the limit.
local CTX_SIZE = {}

local function encoded_size(v)
  local b = {}
  enc(v, b)
  local n = 0
  for i = 1, #b do n = n + #b[i] end
  return n
end

function context_fits(slot, base)
  local bound = (CTX_SIZE[slot] or 0) + cur_bytes
  if bound > MAX_CTX_BYTES then
    local olds = {}
    for k, v in next, cur_over do
      local old = base[k]
      if old == nil then olds[k] = NILV else olds[k] = old end
      if v == NILV then base[k] = nil else base[k] = v end
    end
    bound = encoded_size(base)
    for k, v in next, olds do
      if v == NILV then base[k] = nil else base[k] = v end
    end
    if bound > MAX_CTX_BYTES then
      return false, sformat("ctx: the user's context would be %d bytes, over the limit of %d", bound, MAX_CTX_BYTES)
    end
  end
  CTX_SIZE[slot] = bound
  return true
end

-- Run every rule of every event of a batch. `cols` is a flat array with STRIDE fields per event:
-- id, user, ts, day, data (msgpack or false), context slot, rule set (which gives the campaign and the type),
-- chain depth.
-- Returns a msgpack array of `runs` records, one per rule run: [error|nil, changes|nil, emits|nil]. What a run
-- returns depends only on its event, its context and its script: never on the rest of the batch.
local STRIDE = 8
local function clear_over()
  local over = cur_over
  for k in next, over do over[k] = nil end
  cur_writes = 0
end

function API.run_batch(cols, n, runs)
  local out, no = {spack(">BI4", 0xdd, runs)}, 1   -- one msgpack array of every run's record
  local ev = EVENT
  for i = 0, n - 1 do
    local b = i * STRIDE
    local slot = cols[b + 6]
    local base = CTX[slot]
    if base == nil then base = {}; CTX[slot] = base end
    local rs = RULESETS[cols[b + 7]]
    local ts = cols[b + 3]
    EV.id, EV.type, EV.user, EV.campaign, EV.ts = cols[b + 1], rs.type, cols[b + 2], rs.campaign, ts
    cur_blob, cur_ts, cur_day, cur_base, cur_depth = cols[b + 5], ts, cols[b + 4], base, cols[b + 8]
    local rules = rs.rules
    local bucket = nil
    for j = 1, rs.n do
      local rule = rules[j]
      EV.data = nil
      cur_rng, cur_emits, cur_rule, cur_bytes, cur_sends = nil, NO_EMITS, rule, 0, 0
      local sh = rule.script
      if rule.canary then
        if bucket == nil then bucket = user_bucket(rs.campaign, EV.user) end
        if bucket < rule.canary_bp then sh = rule.canary end
      end
      local script = SCRIPTS[sh]
      local ok, err
      if rule.disabled then ok, err = false, rule.disabled
      elseif script == nil then ok, err = false, "script is not loaded"
      elseif script.stateful then ok, err = run_guarded(run_fresh, script, ev, CTXOBJ)
      else
        ok, err = run_guarded(script.decide, ev, CTXOBJ)
        if script.watched[1] then restore_watched(script.watched) end
      end
      local writes = cur_writes
      if ok then
        rule.fails = 0
        if writes > 0 then ok, err = context_fits(slot, base) end
      elseif err == BUDGET_ERR or err == MEMORY_ERR or err == TIME_ERR then
        rule.fails = rule.fails + 1
        if rule.fails >= DISABLE_AFTER then
          rule.disabled = sformat("rule disabled on this shard: %d runs in a row failed their budget (the last: %s); "
            .. "activate a fixed version of its script to enable it", rule.fails, err)
        end
      end
      if ok then
        local over = cur_over
        no = no + 1
        if writes == 0 then
          out[no] = "\x93\xc0\xc0"
        elseif writes == 1 then
          -- One key written (the common case): the record's head in a single string.pack.
          local k, v = next(over)
          over[k] = nil
          if v == NILV then
            base[k] = nil
            out[no] = spack(">BBBBs1B", 0x93, 0xc0, 0x81, 0xd9, k, 0xc0)
          else
            base[k] = v
            if mtype(v) == "integer" then out[no] = spack(">BBBBs1Bi8", 0x93, 0xc0, 0x81, 0xd9, k, 0xd3, v)
            else out[no] = spack(">BBBBs1", 0x93, 0xc0, 0x81, 0xd9, k); enc(v, out); no = #out end
          end
          cur_writes = 0
        else
          out[no] = writes < 16 and schar(0x93, 0xc0, 0x80 + writes) or spack(">BBBI4", 0x93, 0xc0, 0xdf, writes)
          for k, v in next, over do
            enc(k, out)
            if v == NILV then base[k] = nil; out[#out + 1] = "\xc0" else base[k] = v; enc(v, out) end
          end
          clear_over()
          no = #out
        end
        if cur_emits == NO_EMITS then no = no + 1; out[no] = "\xc0" else enc(cur_emits, out); no = #out end
      else
        if writes > 0 then clear_over() end
        no = no + 1
        out[no] = "\x93"
        enc(errtext(err), out)
        no = #out + 1
        out[no] = "\xc0\xc0"
      end
    end
  end
  cur_blob, cur_base, cur_emits, cur_rule = nil, nil, nil, nil
  return concat(out)
end

-- Contexts by slot: read (msgpack map, or nil when the slot has none), load from a snapshot, forget.
function API.get_contexts(slots, n)
  local out = {spack(">BI4", 0xdd, n)}
  for i = 1, n do enc(CTX[slots[i]] or false, out) end
  return concat(out)
end
-- The same as separate msgpack blobs (one bin element each, false where absent), for snapshots.
function API.get_context_blobs(slots, n)
  local out = {spack(">BI4", 0xdd, n)}
  for i = 1, n do
    local c = CTX[slots[i]]
    if c == nil then out[i + 1] = "\xc2"
    else
      local b = {}
      enc(c, b)
      out[i + 1] = spack(">Bs4", 0xc6, concat(b))
    end
  end
  return concat(out)
end
function API.load_context(slot, blob) CTX[slot] = decode(blob); CTX_SIZE[slot] = #blob end
function API.drop_context(slot) CTX[slot] = nil; CTX_SIZE[slot] = nil end
function API.collect() collectgarbage("collect"); return collectgarbage("count") end

return API
