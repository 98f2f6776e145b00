-- A whole campaign day passed without a check-in: the timer checkin_streak set fired (`checkin.missed`), and the
-- streak is back to 0 (the next check-in starts it again at 1).
-- Context: checkin.streak, checkin.expires (see checkin_streak).
function decide(event, ctx)
  local expires = ctx:get("checkin.expires")
  if expires == nil or event.ts < expires then return end  -- not the streak's due timer: nothing to reset
  ctx:set("checkin.streak", 0)
  ctx:set("checkin.expires", nil)
end
