-- Shared by outbox_due.lua and outbox_claim.lua: one outbox entry as {entry id, action JSON or "", attempts},
-- attempts being the attempts hash's value for the action ("<failures>:<first attempt ms>") or "".
local function _entry(e, attempts_key)
  local f, action = e[2], ''
  for i = 1, #f, 2 do if f[i] == 'action' then action = f[i + 1] end end
  local ok, obj = pcall(cjson.decode, action)
  local n = ''
  if ok and type(obj) == 'table' and type(obj.id) == 'string' then
    n = redis.call('HGET', attempts_key, obj.id) or ''
  end
  return {e[1], action, n}
end
