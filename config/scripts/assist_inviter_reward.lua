-- Assist -> lottery: when three different friends have helped an inviter, the inviter gets 3 chances.
-- Runs on `assist.credited` {helper}, which assist_helper_credit sends to the inviter (user = the inviter) for
-- every help, so the count lives in the inviter's context.
-- Context: assist.helpers (distinct helper ids, at most NEEDED), assist.rewarded.
local NEEDED = 3

function decide(event, ctx)
  local helper = event.data.helper
  if type(helper) ~= "string" or helper == "" or helper == event.user then return end  -- no self-help
  if ctx:get("assist.rewarded") then return end        -- one reward per inviter per campaign
  local helpers = ctx:get("assist.helpers") or {}
  for _, h in ipairs(helpers) do
    if h == helper then return end                     -- the same friend helping twice counts once
  end
  helpers[#helpers + 1] = helper
  ctx:set("assist.helpers", helpers)
  if #helpers >= NEEDED then
    ctx:set("assist.rewarded", true)
    emit("lottery.grant_chance", {chances = 3, pool = "standard", reason = "assist_" .. NEEDED})
  end
end
