-- Team formed: remember the user's team and role, for the reward when the team completes.
-- Event data: {team = "t-1", role = "leader"|"member"} (sent once per member, user = that member).
-- Context: team.id, team.role.
function decide(event, ctx)
  local team, role = event.data.team, event.data.role
  if type(team) ~= "string" or (role ~= "leader" and role ~= "member") then return end
  ctx:set("team.id", team)
  ctx:set("team.role", role)
end
