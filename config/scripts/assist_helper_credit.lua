-- Assist, on the helper's side: the assist gameplay sends `assist.helped` as the HELPER (user = the helper,
-- data.inviter = the inviter's user id). A rule reads and writes only its event's user's context, so the credit
-- goes to the inviter as an event: `assist.credited` {helper}, counted there by assist_inviter_reward.
-- Helping yourself credits nothing. Context: assist.helps (helps given by this user).
function decide(event, ctx)
  local inviter = event.data.inviter
  if type(inviter) ~= "string" or inviter == "" or inviter == event.user then return end  -- no self-help
  ctx:incr("assist.helps", 1)
  send(inviter, "assist.credited", {helper = event.user})
end
