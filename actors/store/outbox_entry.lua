-- Shared by outbox_due.lua and outbox_claim.lua: one outbox entry as {entry id, payload or "", attempts, kind}:
-- kind is the entry's field ("action": an action JSON; on a Redis Cluster also "send" or "rejected", entries the
-- deliverer forwards, see store/commit.py), payload its value, attempts the attempts hash's value for an action
-- ("<failures>:<first attempt ms>") or "".
local function _entry(e, attempts_key)
  local f, kind, payload = e[2], 'action', ''
  for i = 1, #f, 2 do
    if f[i] == 'action' or f[i] == 'send' or f[i] == 'rejected' then
      kind, payload = f[i], f[i + 1]
      break
    end
  end
  local n = ''
  if kind == 'action' then
    local ok, obj = pcall(cjson.decode, payload)
    if ok and type(obj) == 'table' and type(obj.id) == 'string' then
      n = redis.call('HGET', attempts_key, obj.id) or ''
    end
  end
  return {e[1], payload, n, kind}
end
