"""The operators' console (`GET /ui/`) in a real headless Chromium (Debian's `chromium`, driven by Playwright) against
the real system (`run_cluster.py`: Ray, Serve, an embedded Redis), as an operator uses it: sign in, read a campaign's
live stats and plots, push a script version that does not compile and see the line, dry-run, backtest, activate and
roll back, explain a user, replay a failed rule run once its fix is active. Throughout, the page logs no error, no
request fails, and no answer is a 5xx: the only 4xx are the refusals the steps provoke (a wrong token, a push that does
not compile or breaks the test vectors).

Screenshots of the main pages go to a temporary folder, or to $PLAYBUS_CONSOLE_SCREENSHOTS (the README's are made with
`PLAYBUS_CONSOLE_SCREENSHOTS=docs/screenshots .venv/bin/pytest tests/e2e/test_console.py`).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import playwright.sync_api as playwright_api
import pytest

from playbus.loadtest.launcher import ROOT, ClusterProcess, free_port
from tests.support.configs import write_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


CHROMIUM = os.environ.get("PLAYBUS_CHROMIUM", "/usr/bin/chromium")
TOKEN = "console-e2e-token"
CAMPAIGN = "ui"
NOW = int(time.time() * 1000)
QUIZ = """\
function decide(event, ctx)
  local n = ctx:incr("quiz.answered", 1)
  if n == 1 then emit("lottery.grant_chance", {chances = 1}) end
end
"""
# v2: a chance for each of the first three answers (the test vectors, one answer each, still pass); the cap of 2 a
# day refuses the third
QUIZ_V2 = QUIZ.replace("if n == 1 then", "if n <= 3 then")
QUIZ_BAD_LINE_3 = QUIZ.replace("if n == 1 then", "if n == 1 emit")
QUIZ_BREAKS_VECTORS = QUIZ.replace("chances = 1", "chances = 5")
QUIZ_VECTORS = f"""\
cases:
  - name: the first answer grants a chance
    events: [{{id: e1, campaign: {CAMPAIGN}, user: u1, type: quiz.answered, ts: {NOW}}}]
    expect:
      actions: [{{type: lottery.grant_chance, params: {{chances: 1}}}}]
      context: {{quiz.answered: 1}}
"""
CHECKIN = """\
function decide(event, ctx)
  if event.data.boom then error("no reward tier for this check-in") end
  ctx:incr("checkin.days", 1)
  emit("wallet.grant_cash", {amount_cents = 100})
  later(86400000, "checkin.missed", {}, "checkin.streak")
end
"""
CHECKIN_FIXED = CHECKIN.replace('  if event.data.boom then error("no reward tier for this check-in") end\n', "")
RULES = [
    {"id": "quiz", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]},
    {"id": "checkin", "on": "checkin.checked_in", "script": "checkin", "emits": ["wallet.grant_cash"],
     "sends": ["checkin.missed"]},
]
TARGETS = {"lottery": {"stream": "playbus:actions:lottery"},
           # nothing listens there: each cash grant is dead-lettered after one attempt
           "wallet": {"webhook": "http://127.0.0.1:9/grant", "max_attempts": 1, "timeout_s": 1}}
EXPECTED_4XX = {401, 422}  # a wrong token; a push that does not compile, one that breaks the vectors


def call(cluster: ClusterProcess, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(cluster.host, cluster.port, timeout=60)
    try:
        conn.request(method, path, json.dumps(doc).encode() if doc is not None else None,
                     {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def event(eid: str, user: str, type_: str, **data: Any) -> dict[str, Any]:
    return {"id": eid, "campaign": CAMPAIGN, "user": user, "type": type_, "ts": NOW, "data": data}


@dataclass
class Browser:
    page: Any
    base: str
    shots: Path
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    answers: list[tuple[int, str]] = field(default_factory=list)  # 4xx and 5xx seen

    def region(self, name: str) -> Any:
        return self.page.get_by_role("region", name=name, exact=True)

    def shot(self, name: str, top: Any = None, bottom: Any = None, most: int = 1400) -> None:
        """The page from `top`'s top (else its own) to `bottom`'s bottom (else its end), at most `most` px high."""
        scrolled = self.page.evaluate("window.scrollY")
        height = self.page.evaluate("document.documentElement.scrollHeight")
        y0 = max(0, top.bounding_box()["y"] + scrolled - 12) if top is not None else 0
        if bottom is not None:
            box = bottom.bounding_box()
            y1 = box["y"] + box["height"] + scrolled + 12
        else:
            y1 = height
        clip = {"x": 0, "y": y0, "width": 1280, "height": min(most, y1 - y0, height - y0)}
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True, clip=clip)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcess]:
    tmp = tmp_path_factory.mktemp("console")
    (tmp / "quiz.test.yaml").write_text(QUIZ_VECTORS, encoding="utf-8")
    config = write_config(tmp, {"quiz": QUIZ, "checkin": CHECKIN}, RULES, campaign=CAMPAIGN, timezone="UTC",
                          starts="2026-01-01T00:00:00+00:00", ends="2030-01-01T00:00:00+00:00", targets=TARGETS,
                          caps=[{"action": "lottery.grant_chance", "per_user": 2, "period": "day"}],
                          budgets=[{"name": "chances", "action": "lottery.grant_chance", "param": "chances",
                                    "total": 100_000},
                                   {"name": "cash", "action": "wallet.grant_cash", "param": "amount_cents",
                                    "total": 1_000}],
                          shards=2, key_groups=16, batch={"max_events": 500, "max_wait_ms": 2})
    c = ClusterProcess(config, port=free_port(), redis_dir=tmp / "redis", shards=2,
                       env={"PLAYBUS_ADMIN_TOKEN": TOKEN}, cwd=ROOT, python=ROOT / ".venv" / "bin" / "python",
                       start_timeout_s=150, stop_timeout_s=60).start()
    try:
        # Recorded traffic: 24 users answer 1 to 3 quizzes; 12 check-ins against a cash budget of 10 grants; one
        # check-in whose rule fails.
        events = [event(f"q{u}-{k}", f"u{u}", "quiz.answered") for u in range(24) for k in range(1 + u % 3)]
        events += [event(f"c{u}", f"u{u}", "checkin.checked_in") for u in range(12)]
        events.append(event("c-boom", "u-boom", "checkin.checked_in", boom=True))
        status, doc = call(c, "POST", "/v1/events", events)
        assert status == 200 and all(r["status"] == "applied" for r in doc["results"]), doc
        deadline = time.monotonic() + 30
        while call(c, "GET", f"/v1/campaigns/{CAMPAIGN}/stats")[1]["delivery"]["dead"] < 10:
            assert time.monotonic() < deadline, "the cash grants were not dead-lettered within 30 s"
            time.sleep(0.5)
        yield c
    finally:
        rep = c.stop()
    assert rep.exit_code == 0 and rep.stopped_line, c.output()


@pytest.fixture(scope="module")
def ui(cluster: ClusterProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium; .ci/run does it "
                    "when it runs as root), or set PLAYBUS_CHROMIUM to a Chromium binary")
    shots = Path(os.environ.get("PLAYBUS_CONSOLE_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    shots = shots if shots.is_absolute() else ROOT / shots
    shots.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(20_000)
        page = context.new_page()
        b = Browser(page, cluster.url, shots)
        page.on("console", lambda m: b.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: b.page_errors.append(str(e)))
        page.on("requestfailed", lambda r: b.failed_requests.append(f"{r.method} {r.url}: {r.failure}"))
        page.on("response", lambda r: b.answers.append((r.status, f"{r.request.method} {r.url}"))
                if r.status >= 400 else None)
        page.on("dialog", lambda d: d.accept())  # the confirmations of pause, replay, redrive, rescale
        yield b
        context.close()
        browser.close()


def wait_for(predicate: Any, what: str, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, f"not within {timeout_s} s: {what}"
        time.sleep(0.2)


# -- the tests, in the order an operator works ------------------------------------------------------------------

def test_sign_in_refuses_a_wrong_token_then_lists_the_campaigns(ui: Browser) -> None:
    page = ui.page
    page.goto(f"{ui.base}/ui/?poll=1")
    page.get_by_label("Admin token").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("missing or wrong admin token").wait_for()
    assert page.get_by_role("heading", name="Sign in").is_visible()
    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_label("Admin token").press("Enter")  # the keyboard is enough
    page.get_by_role("heading", name="Campaigns", exact=True).wait_for()
    page.get_by_role("link", name=CAMPAIGN, exact=True).wait_for()
    assert page.evaluate("sessionStorage.length") == 1  # the token, for this tab only


def test_campaign_shows_live_stats_plots_and_takes_a_top_up_and_the_kill_switch(ui: Browser,
                                                                               cluster: ClusterProcess) -> None:
    page = ui.page
    page.get_by_role("link", name=CAMPAIGN, exact=True).click()
    page.get_by_role("heading", name=f"Campaign {CAMPAIGN}").wait_for()
    live = ui.region("Live stats")
    cash = live.get_by_role("row", name=re.compile(r"^cash "))
    assert cash.get_by_role("cell").nth(0).inner_text() == "1,000"  # total
    assert live.get_by_role("row").filter(has_text="lottery.grant_chance").count() == 1
    assert live.get_by_role("row").filter(has_text="budget:cash").count() == 1  # 12 check-ins, 10 paid
    checkin = live.get_by_role("row").filter(has_text="checkin")
    assert checkin.get_by_role("cell").nth(2).inner_text() == "1"  # its errors: the failed run
    # polled every second (?poll=1) while traffic flows: the plots draw lines, and the grants climb
    for i in range(5):
        news = [event(f"live{i}-{k}", f"live{i}-{k}", "quiz.answered") for k in range(4 * i + 2)]
        assert call(cluster, "POST", "/v1/events", news)[0] == 200
        time.sleep(0.8)
    grants = live.get_by_role("row").filter(has_text="lottery.grant_chance").get_by_role("cell")
    wait_for(lambda: grants.first.inner_text() == "74", "the new grants in the stats")  # 24 + 2 + 6 + 10 + 14 + 18
    ui.region("Over time").locator("svg polyline").first.wait_for(state="attached")
    assert ui.region("Over time").locator("figure").count() == 2
    ui.shot("campaign", bottom=ui.region("Over time"))

    top_up = ui.region("Top up a budget")
    top_up.get_by_label("Budget").select_option("cash")
    top_up.get_by_label("Amount to add").fill("500")
    top_up.get_by_role("button", name="Top up").click()
    top_up.get_by_text("cash: the total is now 1,500.").wait_for()

    page.get_by_role("button", name="Pause the campaign").click()
    page.get_by_text("Paused: rules do not run").wait_for()
    page.get_by_role("button", name="Resume the campaign").click()
    page.get_by_text("Resumed: rules run again.").wait_for()


def test_a_push_that_does_not_compile_is_shown_at_its_line_and_one_that_breaks_the_vectors_lists_them(
        ui: Browser) -> None:
    page = ui.page
    page.get_by_role("link", name="Scripts", exact=True).click()
    page.get_by_role("link", name="quiz", exact=True).click()
    page.get_by_role("heading", name="Script quiz").wait_for()
    editor = page.get_by_label("Lua source of the next version")
    assert editor.input_value() == QUIZ  # the active version
    push = ui.region("Edit and push a new version")

    editor.fill(QUIZ_BAD_LINE_3)
    push.get_by_role("button", name="Push as a new version").click()
    alert = push.get_by_role("alert")
    alert.get_by_text("Line: 3").wait_for()
    assert "quiz:3:" in alert.inner_text()
    assert push.locator(".gutter span.bad").inner_text() == "3"
    push.get_by_role("button", name="Go to line 3").click()
    selected = "document.activeElement.value.substring(document.activeElement.selectionStart, " \
               "document.activeElement.selectionEnd)"
    assert page.evaluate(selected) == QUIZ_BAD_LINE_3.splitlines()[2]  # the line in error, selected
    ui.shot("script-editor", bottom=push)

    editor.fill(QUIZ_BREAKS_VECTORS)
    push.get_by_role("button", name="Push as a new version").click()
    push.get_by_text("Test vectors that fail (1):").wait_for()
    assert "the first answer grants a chance" in push.get_by_role("alert").inner_text()

    editor.fill(QUIZ_V2)
    push.get_by_role("button", name="Push as a new version").click()
    push.get_by_text("Stored as version 2").wait_for()
    versions = ui.region("Versions")
    versions.get_by_role("button", name="Show the diff").click()
    diff = versions.locator("table.diff")
    diff.wait_for()
    assert versions.get_by_text("v1 → v2: 1 added, 1 removed").is_visible()
    assert "if n <= 3 then" in diff.locator("tr.add").inner_text()
    assert "if n == 1 then" in diff.locator("tr.del").inner_text()


def test_dry_run_of_pasted_events_and_backtest_on_recorded_traffic(ui: Browser) -> None:
    dry = ui.region("Dry run")
    dry.get_by_label("Events (a JSON array, the shape of POST /v1/events)").fill(json.dumps(
        [event("d1", "someone", "quiz.answered"), event("d2", "someone", "quiz.answered")]))
    dry.get_by_label("Starting context of every user (a JSON object)").fill("{}")
    dry.get_by_role("button", name="Dry run").click()
    rows = dry.locator("tbody tr")
    rows.nth(1).wait_for()
    # the editor's source (v2) grants on both answers
    assert "lottery.grant_chance" in rows.nth(0).inner_text() and "lottery.grant_chance" in rows.nth(1).inner_text()
    dry.get_by_label("Events (a JSON array, the shape of POST /v1/events)").fill("[{oops")
    dry.get_by_role("button", name="Dry run").click()
    dry.get_by_text("The events is not valid JSON").wait_for()  # said before anything is sent

    back = ui.region("Backtest against recorded traffic")
    back.get_by_text("a stored version").click()
    back.get_by_label("Version", exact=True).select_option("2")
    back.get_by_label("Last N events").fill("1000")
    back.get_by_role("button", name="Backtest").click()
    back.get_by_role("heading", name="Active v1 against v2").wait_for()
    grants = back.get_by_role("row").filter(has_text="lottery.grant_chance")
    cells = grants.get_by_role("cell")
    # 58 users answered once, 8 twice, 8 three times: v1 grants 74, v2 90 (the third answers are refused by the cap)
    assert [cells.nth(i).inner_text() for i in range(4)] == ["74", "90", "+16", "0"]
    capped = back.get_by_role("row").filter(has_text="cap:lottery.grant_chance/day/2").get_by_role("cell")
    assert [capped.nth(i).inner_text() for i in range(2)] == ["0", "8"]
    ui.shot("backtest", top=back, most=1500)


def test_activate_as_a_canary_roll_out_and_roll_back(ui: Browser, cluster: ClusterProcess) -> None:
    act = ui.region("Activate or roll back")
    act.get_by_label("Version", exact=True).select_option("2")
    act.get_by_label("Share of the users (%)").fill("10")
    act.get_by_role("button", name="Activate").click()
    act.get_by_text("v2 runs for 10% of the users; the others keep v1.").wait_for()
    assert call(cluster, "GET", "/v1/scripts/quiz")[1]["canary"] == {"version": 2, "percent": 10}

    act.get_by_label("Share of the users (%)").fill("100")
    act.get_by_role("button", name="Activate").click()
    act.get_by_text("v2 is active on every shard.").wait_for()
    assert call(cluster, "GET", "/v1/scripts/quiz")[1]["active"] == 2

    act.get_by_role("button", name="Roll back to v1").click()
    act.get_by_text("Rolled back: v1 is active on every shard.").wait_for()
    got = call(cluster, "GET", "/v1/scripts/quiz")[1]
    assert (got["active"], got["canary"]) == (1, None)


def test_explain_a_user_shows_context_timers_and_decisions_newest_first(ui: Browser) -> None:
    page = ui.page
    page.get_by_role("link", name="Explain a user").click()
    page.get_by_label("Campaign").select_option(CAMPAIGN)
    page.get_by_label("User", exact=True).fill("u2")
    page.get_by_label("User", exact=True).press("Enter")
    page.get_by_role("heading", name=f"Explain u2 in {CAMPAIGN}").wait_for()
    ctx = ui.region("Context")
    ctx.get_by_role("row").filter(has_text="quiz.answered").get_by_text("3").wait_for()
    assert ui.region("Pending timers").get_by_role("row").filter(has_text="checkin.streak").count() == 1
    decisions = page.locator("li.decision")
    assert decisions.count() == 4  # three answers and a check-in
    assert "checkin" in decisions.nth(0).inner_text()  # newest first
    assert "no action" in decisions.nth(1).inner_text() and "granted" in decisions.nth(3).inner_text()
    ui.shot("explain")


def test_a_failed_run_is_replayed_once_its_fix_is_active(ui: Browser, cluster: ClusterProcess) -> None:
    page = ui.page
    page.goto(f"{ui.base}/ui/?poll=1#/scripts/checkin")
    page.get_by_role("heading", name="Script checkin").wait_for()
    page.get_by_label("Lua source of the next version").fill(CHECKIN_FIXED)
    ui.region("Edit and push a new version").get_by_role("button", name="Push as a new version").click()
    ui.region("Edit and push a new version").get_by_text("Stored as version 2").wait_for()
    act = ui.region("Activate or roll back")
    act.get_by_label("Version", exact=True).select_option("2")
    act.get_by_role("button", name="Activate").click()
    act.get_by_text("v2 is active on every shard.").wait_for()

    page.get_by_role("link", name="Operations").click()
    failed = ui.region("Failed rule runs")
    failed.get_by_text("no reward tier for this check-in").wait_for()
    assert ui.region("Dead letters").get_by_role("row").filter(has_text="wallet.grant_cash").count() >= 10
    assert ui.region("Shards").get_by_role("row").count() == 3  # the header and two shards
    assert ui.region("Audit log").get_by_role("row").filter(has_text="script.activate").count() >= 3
    ui.shot("operations", bottom=ui.region("Dead letters"), most=1300)
    failed.get_by_label("Rule", exact=True).last.fill("checkin")
    failed.get_by_role("button", name="Replay", exact=True).click()
    status = failed.get_by_role("status")
    status.get_by_text("Replayed", exact=True).wait_for()
    assert re.search(r"Found\s+1\s+Replayed\s+1\s+Failed again\s+0", status.inner_text()), status.inner_text()
    failed.get_by_text("No failed rule run is kept.").wait_for()
    ctx = call(cluster, "GET", f"/v1/campaigns/{CAMPAIGN}/users/u-boom/context")[1]["context"]
    assert ctx == {"checkin.days": 1}


def test_no_page_error_no_failed_request_no_5xx(ui: Browser) -> None:
    ui.page.wait_for_timeout(500)
    assert not ui.page_errors, ui.page_errors
    assert not ui.failed_requests, ui.failed_requests
    assert not [a for a in ui.answers if a[0] >= 500], ui.answers
    assert {s for s, _ in ui.answers} <= EXPECTED_4XX, ui.answers
    # Chromium logs each 4xx answer as "Failed to load resource": only the refusals the steps provoked may be there
    refused = re.compile(r"^Failed to load resource: the server responded with a status of (401|422) ")
    unexpected = [m for m in ui.console_errors if not refused.match(m)]
    assert not unexpected, unexpected
    for name in ("campaign", "script-editor", "backtest", "explain", "operations"):
        assert (ui.shots / f"{name}.png").stat().st_size > 10_000, name
