"""Script test vectors (scripts/NAME.test.yaml): loading and checking the files, running the cases in-process,
the diff of a failing case, a candidate source caught by its vectors, and `playbus test`'s output and exit codes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from playbus.actors.engine.vectors import (
    VectorError,
    load_vectors,
    parse_vectors,
    run_case,
    run_vectors,
    vector_failures,
    vector_path,
)
from playbus.cli import main
from playbus.config import Config, load_config

CONFIG = Path(__file__).resolve().parents[2] / "config"
QUIZ = (CONFIG / "scripts" / "first_quiz_lottery.lua").read_text(encoding="utf-8")

GOOD = """
cases:
  - name: first answer grants a chance
    events: [{id: e1, campaign: spring2026, user: u1, type: quiz.answered, ts: 1769000000000, data: {}}]
    expect:
      actions: [{type: lottery.grant_chance, params: {chances: 1}}]
      context: {quiz.answered: 1}
  - name: second answer grants nothing
    context: {quiz.answered: 1}
    events: [{user: u1, type: quiz.answered, ts: "2026-01-21T10:00:00+08:00"}]
    expect: {actions: [], context: {quiz.answered: 2}}
"""


@pytest.fixture(scope="module")
def example() -> Config:
    return load_config(CONFIG / "example.yaml")


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """A copy of the example config and its scripts, without their vectors, to add vector files to."""
    shutil.copy(CONFIG / "example.yaml", tmp_path / "example.yaml")
    (tmp_path / "scripts").mkdir()
    for lua in (CONFIG / "scripts").glob("*.lua"):
        shutil.copy(lua, tmp_path / "scripts" / lua.name)
    return tmp_path


def write_quiz_vectors(workdir: Path, text: str) -> Path:
    path = workdir / "scripts" / "first_quiz_lottery.test.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# -- running cases ------------------------------------------------------------------------------------------------
def test_cases_pass(example: Config) -> None:
    cases = parse_vectors(GOOD, example, "first_quiz_lottery", "quiz.test.yaml")
    assert [c.name for c in cases] == ["first answer grants a chance", "second answer grants nothing"]
    assert cases[1].events[0]["id"] == "e1" and cases[1].events[0]["campaign"] == "spring2026"  # defaults
    assert cases[1].events[0]["ts"] == 1768960800000  # the ISO time, in ms
    results = [run_case(example, c) for c in cases]
    assert [(r.ok, r.diff) for r in results] == [(True, ""), (True, "")]


def test_a_failing_case_shows_a_readable_diff(example: Config) -> None:
    text = GOOD.replace("chances: 1}", "chances: 2}").replace("quiz.answered: 2}", "quiz.answered: 5}")
    one, two = (run_case(example, c) for c in parse_vectors(text, example, "first_quiz_lottery", "q.test.yaml"))
    assert not one.ok and one.where == "q.test.yaml:3"
    assert one.diff.splitlines() == [
        "actions (- expected, + got):",
        '  -{"type": "lottery.grant_chance", "params": {"chances": 2}}',
        '  +{"type": "lottery.grant_chance", "params": {"chances": 1}}',
    ]
    assert not two.ok
    assert two.diff.splitlines() == [
        "context of u1 (- expected, + got):",
        "   {",
        '  -  "quiz.answered": 5',
        '  +  "quiz.answered": 2',
        "   }",
    ]


def test_unexpected_and_expected_errors(example: Config) -> None:
    text = """
cases:
  - name: a gameplay cannot send team.reward
    events: [{user: u1, type: team.reward, ts: 2026-01-21T10:00:00+08:00, data: {team: t, role: leader}}]
    expect: {errors: ["made by this campaign's rules"]}
  - name: no errors expected
    events: [{user: u1, type: team.reward, ts: 2026-01-21T10:00:00+08:00}]
    expect: {}
"""
    ok, bad = (run_case(example, c) for c in parse_vectors(text, example, "team_role_reward", "t.test.yaml"))
    assert ok.ok, ok.diff
    assert not bad.ok
    assert "errors (expected: parts of them, in order; got):" in bad.diff
    assert "  - (none)" in bad.diff and "events are made by this campaign's rules" in bad.diff


def test_several_users_and_until(example: Config) -> None:
    text = """
cases:
  - name: third helper
    events:
      - {user: h1, type: assist.helped, ts: 1769000000000, data: {inviter: inv}}
      - {user: h2, type: assist.helped, ts: 1769000001000, data: {inviter: inv}}
      - {user: h3, type: assist.helped, ts: 1769000002000, data: {inviter: inv}}
    expect:
      actions: [{type: lottery.grant_chance, user: inv, params: {chances: 3}}]
      contexts: {inv: {assist.helpers: [h1, h2, h3], assist.rewarded: true}, h1: {assist.helps: 1}}
  - name: the streak timer fires only by until
    events: [{user: u1, type: checkin.checked_in, ts: 2026-01-21T10:00:00+08:00}]
    until: 2026-01-22T23:59:59.999+08:00
    expect:
      actions: [{type: wallet.grant_points}]
      context: {checkin.last_day: "2026-01-21", checkin.streak: 1, checkin.total: 1, checkin.expires: 1769097600000}
"""
    for case in parse_vectors(text, example, "assist_inviter_reward", "a.test.yaml"):
        r = run_case(example, case)
        assert r.ok, r.diff
    # the wrong user for an action is a difference
    r = run_case(example, parse_vectors(text.replace("user: inv,", "user: h3,"), example, "x", "a.test.yaml")[0])
    assert not r.ok and '"user": "inv"' in r.diff


# -- bad vector files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "message"), [
    ("cases: [{name: a, events: [{user: u1, type: quiz.answered, ts: 1}], expect: {actions: [{params: {}}]}}]",
     "v.test.yaml:1: case 'a': cases[0].expect.actions[0].type: required"),
    ("cases:\n  - name: a\n    events: [{user: u1, type: t, ts: 1}]\n    expect:\n      actoins: []\n",
     "v.test.yaml:5: case 'a': cases[0].expect.actoins: unknown field (typo?)"),
    ("cases:\n  - name: a\n    events: [{user: u1, type: t, ts: yesterday}]\n    expect: {}\n",
     "v.test.yaml:3: case 'a': cases[0].events[0].ts: expected ms since the epoch"),
    ("cases:\n  - name: a\n    events: [{user: u1, type: t, ts: 1, campaign: autumn}]\n    expect: {}\n",
     "case 'a': cases[0].events[0].campaign: unknown campaign (known: spring2026) (got 'autumn')"),
    ("cases:\n  - name: a\n    events:\n      - {user: u1, type: t, ts: 1}\n      - {user: u2, type: t, ts: 1}\n"
     "    expect: {context: {}}\n", "cases[0].expect.context: the events are of several users (u1, u2)"),
    ("cases:\n  - name: a\n    events: [{user: u1, type: t, ts: 1}]\n    expect: {}\n  - name: a\n"
     "    events: [{user: u1, type: t, ts: 1}]\n    expect: {}\n", "v.test.yaml:5: case 'a': cases[1].name: two cases"),
    ("cases:\n  - name: a\n    events: [{user: u1, type: t, ts: 1}\n    expect: {}\n", "v.test.yaml:4: not valid YAML"),
    ("cases:\n  - name: a\n    name: b\n", "v.test.yaml:3: cases[0].name: this key appears twice"),
    ("- name: a\n", "v.test.yaml:1: (top level): expected a mapping with `cases:`"),
    ("cases:\n  - events: []\n", "v.test.yaml:2: cases[0].name: required"),
])
def test_bad_vector_files_name_file_case_and_field(example: Config, text: str, message: str) -> None:
    with pytest.raises(VectorError) as e:
        parse_vectors(text, example, "first_quiz_lottery", "v.test.yaml")
    assert message in str(e.value)


def test_load_vectors_finds_files_beside_scripts(workdir: Path) -> None:
    cfg = load_config(workdir / "example.yaml")
    assert load_vectors(cfg) == {}
    path = write_quiz_vectors(workdir, GOOD)
    assert vector_path(cfg, "first_quiz_lottery") == path.resolve()
    assert vector_path(cfg, "nope") is None
    vectors = load_vectors(cfg)
    assert list(vectors) == ["first_quiz_lottery"] and len(vectors["first_quiz_lottery"]) == 2
    assert vectors["first_quiz_lottery"][0].file.endswith("scripts/first_quiz_lottery.test.yaml")
    write_quiz_vectors(workdir, "cases: [")
    with pytest.raises(VectorError, match=r"first_quiz_lottery\.test\.yaml:1: not valid YAML"):
        load_vectors(cfg)


# -- a candidate source -------------------------------------------------------------------------------------------
def test_vector_failures_catches_a_candidate_that_breaks_a_vector(workdir: Path) -> None:
    cfg = load_config(workdir / "example.yaml")
    assert vector_failures(cfg, "first_quiz_lottery", QUIZ) == []  # no vectors yet
    write_quiz_vectors(workdir, GOOD)
    assert vector_failures(cfg, "first_quiz_lottery", QUIZ) == []
    assert vector_failures(cfg, "first_quiz_lottery") == []  # the file itself
    broken = QUIZ.replace("if n == 1 then", "if n <= 2 then")
    failures = vector_failures(cfg, "first_quiz_lottery", broken)
    assert len(failures) == 1
    assert "first_quiz_lottery.test.yaml:8: case 'second answer grants nothing' failed:" in failures[0]
    assert '+{"type": "lottery.grant_chance", "params": {"chances": 1}}' not in failures[0]  # nothing expected:
    assert '"pool": "standard"' in failures[0]  # an unexpected action is shown in full
    assert [r.ok for r in run_vectors(cfg, "first_quiz_lottery", broken)] == [True, False]
    # a candidate that does not compile, or that errors, fails too
    assert "does not compile" in vector_failures(cfg, "first_quiz_lottery", "function decide(")[0]
    assert "boom" in vector_failures(cfg, "first_quiz_lottery", 'function decide(e, c) error("boom") end')[0]
    # other scripts' vectors are not run for this script; a bad vector file is a failure
    write_quiz_vectors(workdir, "cases: [{name: x}]")
    assert "cases[0].events: required" in vector_failures(cfg, "first_quiz_lottery", QUIZ)[0]
    assert vector_failures(cfg, "task_accept", "function decide(") == []  # no vectors for it


# -- the command --------------------------------------------------------------------------------------------------
def test_cli_exit_codes_and_output(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(workdir / "example.yaml")
    assert main(["test", "--config", config]) == 0
    assert "no test vectors in" in capsys.readouterr().out
    write_quiz_vectors(workdir, GOOD)
    assert main(["test", "--config", config]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["PASS first_quiz_lottery: first answer grants a chance",
                                    "PASS first_quiz_lottery: second answer grants nothing"]
    assert "2 passed, 0 failed (1 script; no vectors for task_accept," in out
    write_quiz_vectors(workdir, GOOD.replace("quiz.answered: 2}", "quiz.answered: 3}"))
    assert main(["test", "--config", config]) == 1
    out = capsys.readouterr().out
    assert "FAIL first_quiz_lottery: second answer grants nothing  (" in out
    assert '      -  "quiz.answered": 3\n      +  "quiz.answered": 2\n' in out
    assert "1 passed, 1 failed" in out
    # a candidate source given on the command line
    candidate = workdir / "candidate.lua"
    candidate.write_text(QUIZ.replace("if n == 1 then", "if n == 2 then"), encoding="utf-8")
    write_quiz_vectors(workdir, GOOD)
    assert main(["test", "--config", config, "--script", "first_quiz_lottery", "--source", str(candidate)]) == 1
    assert "FAIL first_quiz_lottery: first answer grants a chance" in capsys.readouterr().out
    # a bad vector file, a bad config, an unknown script: 2, with a message
    write_quiz_vectors(workdir, "cases: [{name: a, events: [{user: u1, type: t, ts: 1}], expect: {context: 3}}]")
    assert main(["test", "--config", config]) == 2
    assert "first_quiz_lottery.test.yaml:1: case 'a': cases[0].expect.context: expected a context" in \
        capsys.readouterr().err
    assert main(["test", "--config", str(workdir / "missing.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert main(["test", "--config", config, "--script", "nope"]) == 2
    assert "no rule runs a script named 'nope'" in capsys.readouterr().err
    assert main(["test", "--config", config, "--script", "task_accept"]) == 0
    assert "no test vectors for script task_accept" in capsys.readouterr().out


def test_the_example_vectors_all_pass(example: Config, capsys: pytest.CaptureFixture[str]) -> None:
    vectors = load_vectors(example)
    scripts = {r.script_name for c in example.campaigns for r in c.rules}
    assert set(vectors) == scripts  # every script of the example has vectors
    assert all(len(cases) >= 2 for cases in vectors.values())
    for name, cases in vectors.items():
        for case in cases:
            r = run_case(example, case)
            assert r.ok, f"{name}: {case.name}\n{r.diff}"
    assert main(["test", "--config", str(CONFIG / "example.yaml")]) == 0
    assert "0 failed (10 scripts)" in capsys.readouterr().out
