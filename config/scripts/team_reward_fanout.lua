-- Team completed -> every member: the team gameplay sends ONE `team.completed`, as the leader, with the team:
-- data {team = "t-1", members = {{user = "u1", role = "leader"}, {user = "u2", role = "member"}, ...}}.
-- Each member's reward must be decided in that member's own context (where "paid once for this team" is kept),
-- so this rule sends `team.reward` {team, role} to every member. The leader is sent one too rather than paid
-- here: one rule (team_role_reward) pays every role, with one once-per-team check, for the leader as for anyone.
-- A list that is not one leader (the sender) plus distinct members is ignored. No state: a resent completion
-- sends again, and team_role_reward pays nobody twice.
local MAX_MEMBERS = 50

function decide(event, ctx)
  local team, members = event.data.team, event.data.members
  if type(team) ~= "string" or team == "" or type(members) ~= "table" then return end
  if #members == 0 or #members > MAX_MEMBERS then return end
  local seen, leaders = {}, 0
  for _, m in ipairs(members) do
    if type(m) ~= "table" or type(m.user) ~= "string" or m.user == "" or seen[m.user] then return end
    if m.role == "leader" then
      if m.user ~= event.user then return end              -- only the leader sends the team's completion
      leaders = leaders + 1
    elseif m.role ~= "member" then
      return
    end
    seen[m.user] = true
  end
  if leaders ~= 1 then return end
  for _, m in ipairs(members) do
    send(m.user, "team.reward", {team = team, role = m.role})
  end
end
