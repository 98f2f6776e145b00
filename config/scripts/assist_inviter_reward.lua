-- Assist -> lottery: when three different friends have helped an inviter, the inviter gets 3 chances.
-- Context is per (campaign, user), so the assist gameplay sends `assist.helped` with
-- user = the INVITER and data.helper = the helper's user id; the count lives in the inviter's context.
-- (To reward helpers too, the assist gameplay would send a separate event with user = the helper.)
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
