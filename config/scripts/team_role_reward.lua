-- Team reward -> wallet (+ lottery), in each member's context (`team.reward`, sent by team_reward_fanout):
-- pays by role, once per team per user: the leader 1000 points and a gold-pool lottery chance, a member 300 points.
-- Event data: {team = "t-1", role = "leader"|"member"}.
-- Context: team.id, team.role (the last team paid and the role in it), team.rewarded (the teams paid, the last
-- KEEP of them: a completion is resent within hours, not after KEEP newer teams).
local POINTS_BY_ROLE = {leader = 1000, member = 300}
local KEEP = 32

function decide(event, ctx)
  local team, role = event.data.team, event.data.role
  local points = POINTS_BY_ROLE[role]
  if type(team) ~= "string" or points == nil then return end
  local paid = ctx:get("team.rewarded") or {}
  for _, t in ipairs(paid) do
    if t == team then return end                  -- already paid for this team
  end
  paid[#paid + 1] = team
  if #paid > KEEP then table.remove(paid, 1) end
  ctx:set("team.rewarded", paid)
  ctx:set("team.id", team)
  ctx:set("team.role", role)
  emit("wallet.grant_points", {points = points, reason = "team_" .. role})
  if role == "leader" then
    emit("lottery.grant_chance", {chances = 1, pool = "gold", reason = "team_leader"})
  end
end
