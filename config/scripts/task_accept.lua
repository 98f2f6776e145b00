-- Task accepted: it must be completed within 24 hours. A timer keyed "task.<task>" fires `task.expired` at the
-- deadline (task_expire) unless the completion cancels it first (task_cash_by_tier).
-- Event data: {task = "share_poster_1", tier = 1|2|3}. Context: task.open ({[task] = deadline, ms}).
-- Accepting a task already open changes nothing (the first deadline stands); an expired or completed task may be
-- accepted again, for a new 24 hours (also when its expiry timer is due but has not fired yet: this replaces it).
local LIMIT_MS = 24 * 3600000
local MAX_OPEN = 20                       -- tasks one user may hold open at once

function decide(event, ctx)
  local task = event.data.task
  if type(task) ~= "string" or task == "" or #task > 100 then return end
  local open = ctx:get("task.open") or {}
  local deadline = open[task]
  if deadline ~= nil and event.ts < deadline then return end  -- open: the first deadline stands
  if deadline == nil then                                      -- a new entry: within MAX_OPEN
    local n = 0
    for _ in pairs(open) do n = n + 1 end
    if n >= MAX_OPEN then return end
  end
  open[task] = event.ts + LIMIT_MS
  ctx:set("task.open", open)
  later(LIMIT_MS, "task.expired", {task = task}, "task." .. task)
end
