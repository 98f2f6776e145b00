-- Check-in -> wallet: 10 points per day; every 7th consecutive day pays a cash bonus.
-- Context: checkin.last_day ("YYYY-MM-DD" in campaign time zone), checkin.streak, checkin.total.
-- A second check-in on the same day does nothing; a missed day restarts the streak at 1.
local STREAK = 7
local DAILY_POINTS = 10
local BONUS_CENTS = 700

-- Days since 1970-01-01 of a "YYYY-MM-DD" string (Howard Hinnant's days_from_civil).
local function day_number(s)
  local y, m, d = string.match(s, "^(%d%d%d%d)-(%d%d)-(%d%d)$")
  y, m, d = tonumber(y), tonumber(m), tonumber(d)
  if m <= 2 then y = y - 1 end
  local era = (y >= 0 and y or y - 399) // 400
  local yoe = y - era * 400
  local doy = (153 * (m > 2 and m - 3 or m + 9) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

function decide(event, ctx)
  local day = today()
  local last = ctx:get("checkin.last_day")
  if last == day then return end                      -- already checked in today
  local streak = 1
  if last ~= nil and day_number(day) - day_number(last) == 1 then
    streak = (ctx:get("checkin.streak") or 0) + 1
  end
  ctx:set("checkin.last_day", day)
  ctx:set("checkin.streak", streak)
  ctx:incr("checkin.total", 1)
  emit("wallet.grant_points", {points = DAILY_POINTS, reason = "checkin"})
  if streak % STREAK == 0 then
    emit("wallet.grant_cash", {amount_cents = BONUS_CENTS, reason = "checkin_streak_" .. streak})
  end
end
