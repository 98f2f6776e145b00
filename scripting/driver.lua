-- playbus sandbox driver: trusted Lua that runs the operators' decision scripts.
-- Loaded once per LuaRuntime by scripting/sandbox.py. Scripts never see anything defined here except
-- through the allow-listed environment built by make_env and the ctx/emit/now/today/random helpers.
-- Every value crossing to Python is msgpack bytes, so no Python object ever reaches Lua.
local MAX_INSTR_HOOKS, MAX_MEM_KB = ...

local type, next, pairs, ipairs, select, error, pcall, xpcall = type, next, pairs, ipairs, select, error, pcall, xpcall
local tostring, tonumber, rawget, rawset, rawlen, rawequal = tostring, tonumber, rawget, rawset, rawlen, rawequal
local setmetatable, getmetatable, load = setmetatable, getmetatable, load
local collectgarbage = collectgarbage
local mtype, floor, huge = math.type, math.floor, math.huge
local schar, sbyte, ssub, spack, sunpack, sgsub, srep, sformat =
  string.char, string.byte, string.sub, string.pack, string.unpack, string.gsub, string.rep, string.format
local sfind, smatch, sgmatch = string.find, string.match, string.gmatch
local concat, tunpack = table.concat, table.unpack
local ulen = utf8.len
local sethook = debug.sethook

local BUDGET_ERR = "instruction budget exceeded"
local MEMORY_ERR = "memory cap exceeded"
local MAX_STR = 4096          -- longest string value a context or action may hold
local MAX_REP = 1048576       -- longest string.rep result
local MAX_ENTRIES = 256       -- entries in one table value (all levels)
local MAX_DEPTH = 8           -- nesting of one table value
local MAX_WRITES = 256        -- distinct context keys one rule run may write
local MAX_EMITS = 64          -- actions one rule run may propose
local MAX_KEY = 128           -- longest context key
local PATTERN_COST = 1e8      -- len(subject) ^ (quantifiers + 1) above this is refused

---------------------------------------------------------------------------------------------------
-- Instruction budget and memory cap: one count hook on the main thread, re-armed per rule run.
local steps, limit, exhausted, mem_start, mem_cap = 0, huge, false, 0, huge
local function hook()
  steps = steps + 1
  if steps > limit then
    exhausted = BUDGET_ERR
    error(BUDGET_ERR, 0)
  end
  if collectgarbage("count") - mem_start > mem_cap then
    collectgarbage("collect")
    if collectgarbage("count") - mem_start > mem_cap then
      exhausted = MEMORY_ERR
      error(MEMORY_ERR, 0)
    end
  end
end
sethook(hook, "", 1000)

-- pcall/xpcall that cannot swallow an exhausted budget.
local function rethrow(ok, ...)
  if exhausted then error(exhausted, 0) end
  return ok, ...
end
local function safe_pcall(f, ...) return rethrow(pcall(f, ...)) end
local function safe_xpcall(f, h, ...) return rethrow(xpcall(f, h, ...)) end

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
local function copy_value(v, what, depth, budget)
  local t = type(v)
  if t == "string" then
    if #v > MAX_STR then error(sformat("%s: string of %d bytes exceeds %d", what, #v, MAX_STR), 3) end
    if not ulen(v) then error(what .. ": strings must be valid UTF-8", 3) end
    return v, budget
  elseif t == "number" then
    if v ~= v or v == huge or v == -huge then error(what .. ": NaN and infinities are not storable", 3) end
    return v, budget
  elseif t == "boolean" or t == "nil" then
    return v, budget
  elseif t == "table" then
    if depth > MAX_DEPTH then error(sformat("%s: nested deeper than %d", what, MAX_DEPTH), 3) end
    local out = {}
    for k, x in next, v do
      budget = budget - 1
      if budget < 0 then error(sformat("%s: more than %d entries", what, MAX_ENTRIES), 3) end
      local kt = type(k)
      if not (kt == "string" or mtype(k) == "integer") then
        error(what .. ": table keys must be strings or integers", 3)
      end
      if kt == "string" and (#k > MAX_KEY or not ulen(k)) then
        error(what .. ": table keys must be valid UTF-8 of at most " .. MAX_KEY .. " bytes", 3)
      end
      out[k], budget = copy_value(x, what, depth + 1, budget)
    end
    return out, budget
  end
  error(sformat("%s: a %s cannot be stored (numbers, strings, booleans, tables only)", what, t), 3)
end
local function copy(v, what) return (copy_value(v, what, 1, MAX_ENTRIES)) end

---------------------------------------------------------------------------------------------------
-- The state of the rule run in progress.
local CTX = {}            -- user key -> context table (authoritative, in memory)
local NILV = {}           -- overlay marker of a deleted key
local cur_base, cur_over, cur_writes, cur_emits, cur_rule
local cur_event, cur_blob, cur_ts, cur_day, cur_rng

local function ctx_get(_, k)
  if type(k) ~= "string" then error("ctx:get: key must be a string", 2) end
  local v = cur_over[k]
  if v == nil then v = cur_base[k] elseif v == NILV then return nil end
  if type(v) == "table" then return copy(v, "ctx:get") end
  return v
end

local function ctx_put(k, v)
  if cur_over[k] == nil then
    cur_writes = cur_writes + 1
    if cur_writes > MAX_WRITES then error(sformat("ctx: more than %d keys written in one rule run", MAX_WRITES), 3) end
  end
  if v == nil then cur_over[k] = NILV else cur_over[k] = v end
end

local function ctx_set(_, k, v)
  if type(k) ~= "string" or #k == 0 or #k > MAX_KEY or not ulen(k) then
    error(sformat("ctx:set: key must be a string of 1..%d bytes", MAX_KEY), 2)
  end
  ctx_put(k, copy(v, "ctx:set('" .. k .. "')"))
end

local function ctx_incr(_, k, by)
  if type(k) ~= "string" or #k == 0 or #k > MAX_KEY or not ulen(k) then
    error(sformat("ctx:incr: key must be a string of 1..%d bytes", MAX_KEY), 2)
  end
  if by == nil then by = 1 end
  if type(by) ~= "number" or by ~= by or by == huge or by == -huge then
    error("ctx:incr: 'by' must be a finite number", 2)
  end
  local v = cur_over[k]
  if v == nil then v = cur_base[k] elseif v == NILV then v = nil end
  if v == nil then v = 0 end
  if type(v) ~= "number" then error(sformat("ctx:incr: key '%s' holds a %s, not a number", k, type(v)), 2) end
  v = v + by
  ctx_put(k, v)
  return v
end

local LOCKED = "locked"
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
  params = copy(params, "emit('" .. atype .. "')")
  local bp = cur_rule.budget_params[atype]
  if bp then
    local a = params[bp]
    if mtype(a) ~= "integer" or a < 0 then
      error(sformat("emit('%s'): budget parameter '%s' must be a non-negative integer", atype, bp), 2)
    end
  end
  local n = #cur_emits
  if n >= MAX_EMITS then error(sformat("emit: more than %d actions in one rule run", MAX_EMITS), 2) end
  cur_emits[n + 1] = {atype, params}
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
    local s = cur_event.id .. "\0" .. cur_rule.id
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

local function pattern_guard(fname, f)
  return function(s, p, ...)
    if type(s) == "string" and type(p) == "string" then
      local _, q = sgsub(p, "[%*%+%-%?]", "")
      if (#s + 1) ^ (q + 1) > PATTERN_COST then
        error(sformat("string.%s: pattern with %d repetitions on %d bytes is too costly", fname, q, #s), 2)
      end
    end
    return f(s, p, ...)
  end
end

local safe_string = {}
for k, v in next, string do
  if k ~= "dump" then safe_string[k] = v end
end
safe_string.rep = function(s, n, sep)
  if type(s) == "string" and type(n) == "number" then
    local size = #s * n + (type(sep) == "string" and #sep * (n - 1) or 0)
    if size > MAX_REP then error(sformat("string.rep: result of %.0f bytes exceeds %d", size, MAX_REP), 2) end
  end
  return srep(s, n, sep)
end
local guarded_find = pattern_guard("find", sfind)
safe_string.find = function(s, p, init, plain)
  if plain then return sfind(s, p, init, plain) end
  return guarded_find(s, p, init)
end
safe_string.match = pattern_guard("match", smatch)
safe_string.gmatch = pattern_guard("gmatch", sgmatch)
safe_string.gsub = pattern_guard("gsub", sgsub)

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
  string = readonly(safe_string, "string"), table = readonly(table, "table"),
  math = readonly(safe_math, "math"), utf8 = readonly(utf8, "utf8"),
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, select = select,
  tonumber = tonumber, tostring = tostring, type = type, rawequal = rawequal, rawget = rawget, rawlen = rawlen,
  pcall = safe_pcall, xpcall = safe_xpcall, setmetatable = safe_setmetatable, getmetatable = getmetatable,
  unpack = tunpack,
  emit = emit, now = now, today = today, random = random,
}
local BASE_MT = {__index = BASE, __metatable = LOCKED}


---------------------------------------------------------------------------------------------------
-- Scripts, rules and rule sets, addressed by small integers that Python hands out.
local SCRIPTS, RULES, RULESETS = {}, {}, {}

local function run_guarded(f, ...)
  steps, limit, exhausted, mem_start, mem_cap = 0, MAX_INSTR_HOOKS, false, collectgarbage("count"), MAX_MEM_KB
  local ok, err = pcall(f, ...)
  limit, mem_cap = huge, huge
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

-- Compile one script version: returns true, or false and the message (with "name:line:").
function API.compile(handle, name, source)
  -- Globals live in `defs`; `env` stays empty so that every global assignment reaches __newindex,
  -- which allows definitions while the chunk loads and refuses them afterwards.
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
  local chunk, err = load(source, "=" .. name, "t", env)
  if not chunk then return false, err end
  local ok, rerr = run_guarded(chunk)
  loading = false
  if not ok then return false, errtext(rerr) end
  if type(rawget(defs, "decide")) ~= "function" then
    return false, name .. ": the script must define a global function decide(event, ctx)"
  end
  SCRIPTS[handle] = rawget(defs, "decide")
  return true
end

function API.define_rule(handle, id, script_handle, emits_blob, budget_blob)
  local emits, names = {}, {}
  for _, t in ipairs(decode(emits_blob)) do emits[t] = true; names[#names + 1] = t end
  RULES[handle] = {
    id = id, script = script_handle, emits = emits, emits_text = concat(names, ", "),
    budget_params = decode(budget_blob),
  }
end

function API.set_rule_script(handle, script_handle) RULES[handle].script = script_handle end
function API.drop_script(handle) SCRIPTS[handle] = nil end

function API.define_ruleset(handle, rules_blob)
  local list = {}
  for i, r in ipairs(decode(rules_blob)) do list[i] = RULES[r] end
  RULESETS[handle] = list
end

local EVMT = {
  __index = function(t, k)
    if k == "data" and rawequal(t, cur_event) then
      local d = cur_blob and decode(cur_blob) or {}
      rawset(t, "data", d)
      return d
    end
  end,
  __metatable = LOCKED,
}

-- Run every rule of every event of a batch. `cols` is a flat array with STRIDE fields per event:
-- id, type, user, campaign, ts, day, data (msgpack or false), context key, rule set.
-- Returns one msgpack record per rule run, concatenated: [error|nil, changes|nil, emits|nil].
local STRIDE = 9
function API.run_batch(cols, n)
  local out = {}
  for i = 0, n - 1 do
    local b = i * STRIDE
    local key = cols[b + 8]
    local base = CTX[key]
    if base == nil then base = {}; CTX[key] = base end
    local rs = RULESETS[cols[b + 9]]
    for j = 1, #rs do
      local rule = rs[j]
      local ev = setmetatable({
        id = cols[b + 1], type = cols[b + 2], user = cols[b + 3], campaign = cols[b + 4], ts = cols[b + 5],
      }, EVMT)
      cur_event, cur_blob, cur_ts, cur_day, cur_rng = ev, cols[b + 7], cols[b + 5], cols[b + 6], nil
      cur_base, cur_over, cur_writes, cur_emits, cur_rule = base, {}, 0, {}, rule
      local fn = SCRIPTS[rule.script]
      local ok, err
      if fn == nil then ok, err = false, "script is not loaded"
      else ok, err = run_guarded(fn, ev, CTXOBJ) end
      if ok then
        local over = cur_over
        if next(over) == nil then
          out[#out + 1] = "\x93\xc0\xc0"
        else
          out[#out + 1] = "\x93\xc0"
          local count = 0
          for _ in next, over do count = count + 1 end
          out[#out + 1] = count < 16 and schar(0x80 + count) or spack(">BI4", 0xdf, count)
          for k, v in next, over do
            enc(k, out)
            if v == NILV then base[k] = nil; out[#out + 1] = "\xc0" else base[k] = v; enc(v, out) end
          end
        end
        if #cur_emits == 0 then out[#out + 1] = "\xc0" else enc(cur_emits, out) end
      else
        out[#out + 1] = "\x93"
        enc(errtext(err), out)
        out[#out + 1] = "\xc0\xc0"
      end
    end
  end
  cur_event, cur_blob, cur_base, cur_over, cur_emits, cur_rule = nil, nil, nil, nil, nil, nil
  return concat(out)
end

-- Contexts: read (msgpack map, or nil when the user has none), load from a snapshot, forget.
function API.get_contexts(keys_blob)
  local out = {}
  local keys = decode(keys_blob)
  out[1] = spack(">BI4", 0xdd, #keys)
  for i = 1, #keys do enc(CTX[keys[i]] or false, out) end
  return concat(out)
end
-- The same as separate msgpack blobs (one bin element each, false where absent), for snapshots.
function API.get_context_blobs(keys_blob)
  local out = {}
  local keys = decode(keys_blob)
  out[1] = spack(">BI4", 0xdd, #keys)
  for i = 1, #keys do
    local c = CTX[keys[i]]
    if c == nil then out[#out + 1] = "\xc2"
    else
      local b = {}
      enc(c, b)
      out[#out + 1] = spack(">Bs4", 0xc6, concat(b))
    end
  end
  return concat(out)
end
function API.load_context(key, blob) CTX[key] = decode(blob) end
function API.drop_context(key) CTX[key] = nil end
function API.clear_contexts() CTX = {} end
function API.context_count()
  local n = 0
  for _ in next, CTX do n = n + 1 end
  return n
end
function API.collect() collectgarbage("collect"); return collectgarbage("count") end

return API
