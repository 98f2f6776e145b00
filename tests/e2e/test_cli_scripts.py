"""The `playbus` command as an operator runs it: `scripts ...` against the running system, and `dry-run`.

`playbus scripts` uses the session cluster of conftest.py through PLAYBUS_URL and PLAYBUS_ADMIN_TOKEN. It works
on the `checkin_count` script (no other test touches it) and dry-runs `first_quiz` version 1 or a source file,
which no test changes, so the tests do not depend on the order in which modules run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from playbus.actors.engine.keys import action_id
from tests.e2e.conftest import CAMPAIGN, CHECKIN_V1, ROOT, TOKEN, Playbus, event

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

PLAYBUS = ROOT / ".venv" / "bin" / "playbus"

CHECKIN_V2 = """\
function decide(event, ctx)
  ctx:incr("checkin.count", 10)
end
"""


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PLAYBUS), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def cli_env(playbus: Playbus, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PLAYBUS_URL", "PLAYBUS_ADMIN_TOKEN")}
    env["PLAYBUS_URL"] = playbus.url
    if token is not None:
        env["PLAYBUS_ADMIN_TOKEN"] = token
    return env


def ok_json(p: subprocess.CompletedProcess[str]) -> Any:
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def pushed(playbus: Playbus, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """`playbus scripts push checkin_count.lua` (version 2), once for the module."""
    path = tmp_path_factory.mktemp("cli") / "checkin_count.lua"
    path.write_text(CHECKIN_V2, encoding="utf-8")
    return run("scripts", "push", str(path), env=cli_env(playbus))


def show(playbus: Playbus, name: str = "checkin_count") -> dict[str, Any]:
    return ok_json(run("scripts", "show", name, env=cli_env(playbus)))  # type: ignore[no-any-return]


def test_scripts_push_uploads_the_file_as_the_next_version(pushed: subprocess.CompletedProcess[str]) -> None:
    assert ok_json(pushed) == {"name": "checkin_count", "version": 2}


def test_scripts_push_of_a_broken_script_exits_2_with_the_line(
        playbus: Playbus, pushed: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    bad = tmp_path / "broken.lua"
    bad.write_text("function decide(event, ctx)\n  ctx:incr(\"checkin.count\",\nend\n", encoding="utf-8")
    p = run("scripts", "push", str(bad), "--name", "checkin_count", env=cli_env(playbus))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stdout == ""
    assert p.stderr.startswith("playbus: PUT /v1/scripts/checkin_count: HTTP 422: "), p.stderr
    assert p.stderr.rstrip().endswith("(line 3)"), p.stderr  # the compile error at its line, readable
    assert show(playbus)["versions"] == [1, 2]


def test_scripts_list_shows_every_script(playbus: Playbus, pushed: subprocess.CompletedProcess[str]) -> None:
    listing = ok_json(run("scripts", "list", env=cli_env(playbus)))
    by_name = {s["name"]: s for s in listing["scripts"]}
    assert set(by_name) >= {"first_quiz", "checkin_count", "helped", "credited", "deadline"}  # (+ pushed ones)
    assert by_name["checkin_count"] == {"name": "checkin_count", "active": 1, "versions": [1, 2]}


def test_scripts_show_gives_versions_active_and_source(playbus: Playbus,
                                                       pushed: subprocess.CompletedProcess[str]) -> None:
    assert show(playbus) == {"name": "checkin_count", "active": 1, "versions": [1, 2], "source": CHECKIN_V1,
                             "canary": None}


def test_scripts_activate_makes_every_shard_run_the_version(playbus: Playbus,
                                                            pushed: subprocess.CompletedProcess[str]) -> None:
    users = ["u-cli-checkin-0", "u-cli-checkin-1", "u-cli-checkin-2", "u-cli-checkin-3"]
    try:
        assert ok_json(run("scripts", "activate", "checkin_count", "2", env=cli_env(playbus))) == {
            "name": "checkin_count", "active": 2}
        r = playbus.post_events([event(f"cli-checkin-{u}", u, type="checkin.checked_in") for u in users])
        assert r.status == 200
        assert [x["status"] for x in r.json()["results"]] == ["applied"] * len(users)
        for u in users:
            assert playbus.context(u) == {"checkin.count": 10}
            assert [d["script_version"] for d in playbus.decisions(u)] == [2]
        assert show(playbus) == {"name": "checkin_count", "active": 2, "versions": [1, 2], "source": CHECKIN_V2,
                                 "canary": None}
    finally:
        back = run("scripts", "activate", "checkin_count", "1", env=cli_env(playbus))
    assert ok_json(back) == {"name": "checkin_count", "active": 1}
    missing = run("scripts", "activate", "checkin_count", "7", env=cli_env(playbus))
    assert missing.returncode == 2 and "HTTP 422" in missing.stderr, (missing.stdout, missing.stderr)


def test_scripts_dry_run_with_version_source_and_context(playbus: Playbus, tmp_path: Path) -> None:
    user = "u-cli-dry"
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(e) for e in [event("cli-dry-1", user), event("cli-dry-2", user),
                                                        {"id": "cli-dry-bad"}]) + "\n", encoding="utf-8")
    context = tmp_path / "context.json"
    context.write_text(json.dumps({"quiz.answered": 0}), encoding="utf-8")
    source = tmp_path / "every_time.lua"
    source.write_text('function decide(event, ctx)\n  local n = ctx:incr("quiz.answered", 1)\n'
                      '  emit("lottery.grant_chance", {chances = n})\nend\n', encoding="utf-8")
    rejected = {"id": "cli-dry-bad", "status": "rejected", "actions": [],
                "errors": ["campaign: expected a string of 1..256 characters, got nothing"]}

    def action(eid: str, chances: int, version: int) -> dict[str, Any]:
        return {"id": action_id(CAMPAIGN, user, eid, "first_quiz", 0), "type": "lottery.grant_chance",
                "campaign": CAMPAIGN, "user": user, "params": {"chances": chances}, "cause": eid,
                "rule": "first_quiz", "script_version": version}

    got = ok_json(run("scripts", "dry-run", "first_quiz", "--events", str(events), "--version", "1",
                      "--context", str(context), env=cli_env(playbus)))
    assert got == {"results": [
        {"id": "cli-dry-1", "status": "applied", "actions": [action("cli-dry-1", 1, 1)], "errors": []},
        {"id": "cli-dry-2", "status": "applied", "actions": [], "errors": []},
        rejected,
    ], "made": []}
    got = ok_json(run("scripts", "dry-run", "first_quiz", "--events", str(events), "--source", str(source),
                      env=cli_env(playbus)))
    assert [r["status"] for r in got["results"]] == ["applied", "applied", "rejected"]
    assert [[a["params"] for a in r["actions"]] for r in got["results"]] == [[{"chances": 1}], [{"chances": 2}], []]
    # No side effect: the user does not exist for real.
    assert playbus.context(user) == {}
    assert playbus.decisions(user) == []


def test_scripts_refuse_without_or_with_a_wrong_token(playbus: Playbus) -> None:
    p = run("scripts", "list", env=cli_env(playbus, token=None))
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == "playbus: no admin token: set PLAYBUS_ADMIN_TOKEN or pass --token\n"
    p = run("scripts", "list", env=cli_env(playbus, token="wrong"))
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr.startswith("playbus: GET /v1/scripts: HTTP 401: "), p.stderr
    p = run("scripts", "--url", "http://127.0.0.1:1", "list", env=cli_env(playbus))
    assert p.returncode == 2
    assert p.stderr.startswith("playbus: cannot reach playbus at http://127.0.0.1:1"), p.stderr


def test_dry_run_of_the_example_campaign_prints_one_json_line_per_event_and_per_event_its_rules_made() -> None:
    p = run("dry-run", "--config", "config/example.yaml", "--events", "config/example-events.jsonl")
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in (ROOT / "config/example-events.jsonl").read_text().splitlines()
              if line.strip()]
    every = [json.loads(line) for line in p.stdout.splitlines()]
    lines = [x for x in every if "made" not in x]
    assert len(lines) == len(events) == 42
    assert [x["id"] for x in lines] == [e["id"] for e in events]
    for x in lines:
        assert set(x) == {"id", "status", "actions", "errors", "context"}, x
        assert x["status"] in ("applied", "duplicate", "rejected")
    made = [x for x in every if "made" in x]
    assert sorted((x["made"]["via"], x["made"]["type"]) for x in made) == sorted(
        [("send", "assist.credited")] * 5 + [("send", "team.reward")] * 6 + [("timer", "checkin.missed")] * 2
        + [("timer", "task.expired")])
    assert all(x["status"] == "applied" and x["made"]["depth"] == 1 for x in made)
    assert lines[0] == {
        "id": "evt-quiz-0001", "status": "applied", "errors": [], "context": {"quiz.answered": 1},
        "actions": [{"id": action_id("spring2026", "u-alice", "evt-quiz-0001", "first_quiz_lottery", 0),
                     "type": "lottery.grant_chance", "campaign": "spring2026", "user": "u-alice",
                     "params": {"pool": "standard", "reason": "first_quiz", "chances": 1}, "cause": "evt-quiz-0001",
                     "rule": "first_quiz_lottery", "script_version": 1}]}
    assert lines[2] == {"id": "evt-quiz-0001", "status": "duplicate", "actions": lines[0]["actions"],
                        "errors": [], "context": {"quiz.answered": 2}}  # a retry shows what the id granted


def test_dry_run_with_a_bad_config_path_exits_2_with_a_message(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    p = run("dry-run", "--config", str(missing), "--events", "config/example-events.jsonl")
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == f"playbus: {missing}: cannot read config: No such file or directory\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("shards: many\ncampaigns: []\n", encoding="utf-8")
    p = run("dry-run", "--config", str(bad), "--events", "config/example-events.jsonl")
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr.startswith(f"playbus: {bad}:1: shards: "), p.stderr
