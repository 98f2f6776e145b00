-- Check-in -> wallet: 10 points per day; every 7th consecutive day pays a cash bonus.
-- A missed day breaks the streak by a timer: each check-in (re)sets the timer "checkin.streak_expiry", due at the
-- end of the next campaign day. A check-in on that day replaces it; if none comes, it fires `checkin.missed`
-- and checkin_streak_reset puts the streak back to 0. A second check-in on the same day does nothing.
-- Context: checkin.last_day ("YYYY-MM-DD", campaign time zone), checkin.streak, checkin.total,
-- checkin.expires (when the pending timer is due, ms).
local STREAK = 7
local DAILY_POINTS = 10
local BONUS_CENTS = 700
local DAY = 86400000
local TZ_OFFSET = 8 * 3600000   -- the campaign's Asia/Shanghai: UTC+08:00 all year (no daylight saving)

function decide(event, ctx)
  local day = today()
  if ctx:get("checkin.last_day") == day then return end    -- already checked in today
  local streak = ctx:get("checkin.streak") or 0
  local expires = ctx:get("checkin.expires")
  -- A cluster fires a timer once its time has passed on the wall clock, so a check-in can be decided before
  -- the checkin.missed that is due before it: the streak is broken all the same.
  if expires ~= nil and event.ts >= expires then streak = 0 end
  streak = streak + 1
  -- The end of the next campaign day: the local midnight after tomorrow's, in ms since the epoch.
  local midnight = (event.ts + TZ_OFFSET) // DAY * DAY - TZ_OFFSET
  local due = midnight + 2 * DAY
  later(due - event.ts, "checkin.missed", {last_day = day}, "checkin.streak_expiry")
  ctx:set("checkin.last_day", day)
  ctx:set("checkin.streak", streak)
  ctx:set("checkin.expires", due)
  ctx:incr("checkin.total", 1)
  emit("wallet.grant_points", {points = DAILY_POINTS, reason = "checkin"})
  if streak % STREAK == 0 then
    emit("wallet.grant_cash", {amount_cents = BONUS_CENTS, reason = "checkin_streak_" .. streak})
  end
end
