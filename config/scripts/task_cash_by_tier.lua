-- Task -> wallet (+ lottery): a task completed within 24 hours of its acceptance pays cash by its tier, and
-- cancels its deadline timer; a top-tier task also grants a chance in the gold (more valuable) lottery pool.
-- A task not accepted, already completed or past its deadline (see task_accept, task_expire) pays nothing.
-- Event data: {task = "share_poster_1", tier = 1|2|3}. Context: task.open, task.completed, task.max_tier.
-- Cash is in integer cents: it is spent from the campaign's `cash` budget and capped per user.
local CASH_BY_TIER = {100, 300, 1000}   -- tier 1: 1.00 CNY, tier 2: 3.00 CNY, tier 3: 10.00 CNY
local GOLD_TIER = 3

function decide(event, ctx)
  local task = event.data.task
  local tier = math.tointeger(event.data.tier)
  if type(task) ~= "string" or tier == nil or tier < 1 then return end  -- malformed: no payout
  local open = ctx:get("task.open") or {}
  local deadline = open[task]
  -- Past the deadline: the timer may not have fired yet (a cluster fires it once its time has passed on the
  -- wall clock); it will mark the task expired.
  if deadline == nil or event.ts >= deadline then return end
  open[task] = nil
  ctx:set("task.open", next(open) ~= nil and open or nil)
  cancel("task." .. task)
  if tier > #CASH_BY_TIER then tier = #CASH_BY_TIER end
  ctx:incr("task.completed", 1)
  if tier > (ctx:get("task.max_tier") or 0) then ctx:set("task.max_tier", tier) end
  emit("wallet.grant_cash", {amount_cents = CASH_BY_TIER[tier], reason = "task_tier_" .. tier, task = task})
  if tier >= GOLD_TIER then
    emit("lottery.grant_chance", {chances = 1, pool = "gold", reason = "task_tier_" .. tier})
  end
end
