-- A task's 24 hours are over (`task.expired`, the timer task_accept set and no completion cancelled): the task is
-- no longer open and is marked expired, so completing it now pays nothing.
-- Event data: {task}. Context: task.open, task.expired (the last KEEP tasks that expired, oldest first).
local KEEP = 20

function decide(event, ctx)
  local task = event.data.task
  if type(task) ~= "string" then return end
  local open = ctx:get("task.open") or {}
  local deadline = open[task]
  if deadline == nil or event.ts < deadline then return end  -- completed meanwhile, or not due: nothing to do
  open[task] = nil
  ctx:set("task.open", next(open) ~= nil and open or nil)
  local expired = ctx:get("task.expired") or {}
  expired[#expired + 1] = task
  if #expired > KEEP then table.remove(expired, 1) end
  ctx:set("task.expired", expired)
end
