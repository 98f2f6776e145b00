-- Task -> wallet (+ lottery): a completed task pays cash by its tier; a top-tier task also grants a
-- chance in the gold (more valuable) lottery pool.
-- Event data: {task = "share_poster", tier = 1|2|3}. Context: task.completed, task.max_tier.
-- Cash is in integer cents: it is spent from the campaign's `cash` budget and capped per user.
local CASH_BY_TIER = {100, 300, 1000}   -- tier 1: 1.00 CNY, tier 2: 3.00 CNY, tier 3: 10.00 CNY
local GOLD_TIER = 3

function decide(event, ctx)
  local tier = math.tointeger(event.data.tier)
  if tier == nil or tier < 1 then return end          -- malformed or tier-less task: no payout
  if tier > #CASH_BY_TIER then tier = #CASH_BY_TIER end
  ctx:incr("task.completed", 1)
  if tier > (ctx:get("task.max_tier") or 0) then ctx:set("task.max_tier", tier) end
  emit("wallet.grant_cash", {amount_cents = CASH_BY_TIER[tier], reason = "task_tier_" .. tier,
                             task = event.data.task})
  if tier >= GOLD_TIER then
    emit("lottery.grant_chance", {chances = 1, pool = "gold", reason = "task_tier_" .. tier})
  end
end
