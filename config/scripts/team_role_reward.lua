-- Team completed -> wallet (+ lottery): members are rewarded by the role stored when the team formed;
-- the leader also gets a gold-pool lottery chance. Each user is rewarded once per team.
-- Event data: {team = "t-1"} (sent once per member, user = that member).
-- Context: team.id, team.role (from team.formed), team.rewarded (id of the team already paid).
local POINTS_BY_ROLE = {leader = 1000, member = 300}

function decide(event, ctx)
  local team = event.data.team
  if team == nil or team ~= ctx:get("team.id") then return end   -- not this user's team
  if ctx:get("team.rewarded") == team then return end             -- already paid for this team
  local role = ctx:get("team.role")
  local points = POINTS_BY_ROLE[role]
  if points == nil then return end
  ctx:set("team.rewarded", team)
  emit("wallet.grant_points", {points = points, reason = "team_" .. role})
  if role == "leader" then
    emit("lottery.grant_chance", {chances = 1, pool = "gold", reason = "team_leader"})
  end
end
