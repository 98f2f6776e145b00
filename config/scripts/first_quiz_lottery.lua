-- Quiz -> lottery: the first quiz answer of a user in this campaign grants one lottery chance.
-- Context: quiz.answered (number of answers so far).
function decide(event, ctx)
  local n = ctx:incr("quiz.answered", 1)
  if n == 1 then
    emit("lottery.grant_chance", {chances = 1, pool = "standard", reason = "first_quiz"})
  end
end
