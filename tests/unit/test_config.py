"""The config loader: the example loads; each mistake names the file, line, field, value and expectation."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest
import yaml

from playbus.config import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "example.yaml"

BASE = textwrap.dedent("""\
    shards: 2
    key_groups: 16
    targets:
      lottery: {stream: "playbus:actions:lottery"}
      wallet: {webhook: "http://127.0.0.1:9100/grant"}
    campaigns:
      - id: spring2026
        timezone: Asia/Shanghai
        starts: 2026-01-20T00:00:00+08:00
        ends: 2026-02-20T00:00:00+08:00
        rules:
          - id: first_quiz_lottery
            on: quiz.answered
            script: scripts/rule.lua
            emits: [lottery.grant_chance, wallet.grant_cash]
        caps:
          - {action: lottery.grant_chance, per_user: 3, period: day}
        budgets:
          - {name: cash, action: wallet.grant_cash, param: amount_cents, total: 1000}
""")


def write(tmp_path: Path, text: str) -> Path:
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "rule.lua").write_text("function decide(event, ctx) end\n")
    path = tmp_path / "playbus.yaml"
    path.write_text(text)
    return path


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} must occur exactly once in the test YAML"
    return text.replace(old, new)


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line of `text` containing `needle`."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {hits}"
    return hits[0]


def fail(tmp_path: Path, text: str) -> tuple[ConfigError, Path]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value, path


# -- what loads ------------------------------------------------------------------------------------


def test_example_config_loads_with_every_rule_script_read() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.source_file == str(EXAMPLE)
    assert cfg.shards == 4 and cfg.key_groups == 128
    assert cfg.targets["lottery"].stream == "playbus:actions:lottery"
    assert cfg.targets["wallet"].webhook == "http://127.0.0.1:9100/grant"
    (camp,) = cfg.campaigns
    assert camp.id == "spring2026" and camp.timezone == "Asia/Shanghai"
    assert [(r.id, r.on) for r in camp.rules] == [
        ("first_quiz_lottery", "quiz.answered"),
        ("task_accept", "task.accepted"),
        ("task_cash_by_tier", "task.completed"),
        ("task_expire", "task.expired"),
        ("checkin_streak", "checkin.checked_in"),
        ("checkin_streak_reset", "checkin.missed"),
        ("assist_helper_credit", "assist.helped"),
        ("assist_inviter_reward", "assist.credited"),
        ("team_reward_fanout", "team.completed"),
        ("team_role_reward", "team.reward"),
    ]
    assert {r.id: r.sends for r in camp.rules if r.sends} == {
        "task_accept": ("task.expired",), "checkin_streak": ("checkin.missed",),
        "assist_helper_credit": ("assist.credited",), "team_reward_fanout": ("team.reward",)}
    for rule in camp.rules:
        assert rule.script_name == rule.id
        assert "function decide(event, ctx)" in rule.source
    assert {(c.action, c.per_user, c.period) for c in camp.caps} >= {
        ("lottery.grant_chance", 3, "day"), ("wallet.grant_cash", 3, "day"),
    }
    assert [(b.name, b.action, b.param, b.total) for b in camp.budgets] == [
        ("cash", "wallet.grant_cash", "amount_cents", 3000),
        ("points", "wallet.grant_points", "points", 1_000_000),
    ]


def test_minimal_config_loads_and_reads_script_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    rule = cfg.campaigns[0].rules[0]
    assert rule.script_name == "rule"
    assert rule.source == "function decide(event, ctx) end\n"
    assert cfg.campaigns[0].starts_ms == 1768838400000


def test_bare_on_key_is_read_as_the_string_not_yaml11_true(tmp_path: Path) -> None:
    # The trap: plain PyYAML reads the key `on` as the boolean True.
    assert True in yaml.safe_load("on: quiz.answered")
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.campaigns[0].rules[0].on == "quiz.answered"
    # yes/no/on/off values are strings too; only true/false are booleans.
    cfg = load_config(write(tmp_path, edit("on: quiz.answered", "on: yes")))
    assert cfg.campaigns[0].rules[0].on == "yes"


# -- what does not, and what the message says --------------------------------------------------------


def assert_message(err: ConfigError, path: Path, line: int, field: str, *parts: str) -> None:
    msg = str(err)
    assert msg.startswith(f"{path}:{line}: {field}: "), msg
    assert err.file == str(path)
    assert err.path == field
    for part in parts:
        assert part in msg, msg


def test_unknown_field_is_reported_as_a_typo(tmp_path: Path) -> None:
    text = edit("    caps:\n", "    capz:\n")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "capz:"), "campaigns[0].capz", "unknown field (typo?)")


def test_unknown_top_level_scalar_field_shows_its_value(tmp_path: Path) -> None:
    text = edit("shards: 2\n", "shards: 2\nshard: 3\n")
    err, path = fail(tmp_path, text)
    assert_message(err, path, 2, "shard", "unknown field (typo?)", "(got 3)")


def test_missing_required_field(tmp_path: Path) -> None:
    text = edit("        on: quiz.answered\n", "")
    err, path = fail(tmp_path, text)
    # Reported at the rule that lacks it.
    assert_message(err, path, line_of(text, "- id: first_quiz_lottery"), "campaigns[0].rules[0].on",
                   "required field is missing")


def test_wrong_type(tmp_path: Path) -> None:
    text = edit("per_user: 3", "per_user: three")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "per_user"), "campaigns[0].caps[0].per_user",
                   "valid integer", "(got 'three')")


def test_bad_period_enum(tmp_path: Path) -> None:
    text = edit("period: day", "period: month")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "period"), "campaigns[0].caps[0].period",
                   "'day', 'week' or 'campaign'", "(got 'month')")


def test_negative_per_user(tmp_path: Path) -> None:
    text = edit("per_user: 3", "per_user: -1")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "per_user"), "campaigns[0].caps[0].per_user",
                   "greater than or equal to 0", "(got -1)")


def test_negative_budget_total(tmp_path: Path) -> None:
    text = edit("total: 1000", "total: -5")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "total:"), "campaigns[0].budgets[0].total",
                   "greater than or equal to 0", "(got -5)")


def test_unknown_timezone(tmp_path: Path) -> None:
    text = edit("timezone: Asia/Shanghai", "timezone: Asia/Shanghia")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "timezone"), "campaigns[0].timezone",
                   "IANA name", "(got 'Asia/Shanghia')")


def test_naive_datetime_needs_an_offset(tmp_path: Path) -> None:
    text = edit("starts: 2026-01-20T00:00:00+08:00", "starts: 2026-01-20T00:00:00")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "starts:"), "campaigns[0].starts",
                   "expected a time with a UTC offset", "(got '2026-01-20T00:00:00')")


def test_ends_before_starts_points_at_ends(tmp_path: Path) -> None:
    text = edit("ends: 2026-02-20T00:00:00+08:00", "ends: 2026-01-10T00:00:00+08:00")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "ends:"), "campaigns[0].ends",
                   "must be after 'starts' (2026-01-20T00:00:00+08:00)", "(got '2026-01-10T00:00:00+08:00')")


def test_duplicate_rule_id_points_at_the_second_rule(tmp_path: Path) -> None:
    second = "      - {id: first_quiz_lottery, on: task.completed, script: scripts/rule.lua}\n"
    text = edit("    caps:\n", second + "    caps:\n")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "{id: first_quiz_lottery"), "campaigns[0].rules[1].id",
                   "rule ids must be unique", "(got 'first_quiz_lottery')")


def test_emitted_action_needs_a_target_for_its_gameplay(tmp_path: Path) -> None:
    text = edit("emits: [lottery.grant_chance, wallet.grant_cash]",
                "emits: [lottery.grant_chance, wallet.grant_cash, coupon.grant]")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "emits:"), "campaigns[0].rules[0].emits[2]",
                   "no target for gameplay 'coupon'", "['lottery', 'wallet']", "(got 'coupon.grant')")


def test_emits_must_be_action_types(tmp_path: Path) -> None:
    text = edit("emits: [lottery.grant_chance, wallet.grant_cash]", "emits: [lottery.grant_chance, lottery]")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "emits:"), "campaigns[0].rules[0].emits[1]",
                   "expected an action type like 'lottery.grant_chance'", "(got 'lottery')")


def test_cap_on_an_action_no_rule_emits(tmp_path: Path) -> None:
    text = edit("{action: lottery.grant_chance, per_user", "{action: lottery.grant_gold, per_user")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "lottery.grant_gold"), "campaigns[0].caps[0].action",
                   "no rule of this campaign emits 'lottery.grant_gold'", "(got 'lottery.grant_gold')")


def test_budget_on_an_action_no_rule_emits(tmp_path: Path) -> None:
    text = edit("action: wallet.grant_cash, param", "action: wallet.grant_points, param")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "wallet.grant_points"), "campaigns[0].budgets[0].action",
                   "no rule of this campaign emits 'wallet.grant_points'", "(got 'wallet.grant_points')")


def test_missing_script_file(tmp_path: Path) -> None:
    text = edit("script: scripts/rule.lua", "script: scripts/missing.lua")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "script:"), "campaigns[0].rules[0].script",
                   f"cannot read script '{tmp_path / 'scripts' / 'missing.lua'}'", "No such file",
                   "(got 'scripts/missing.lua')")


def test_invalid_yaml_syntax_names_the_line(tmp_path: Path) -> None:
    text = edit("timezone: Asia/Shanghai", "timezone: [Asia/Shanghai")
    err, path = fail(tmp_path, text)
    assert str(err).startswith(f"{path}:{line_of(text, 'starts:')}: not valid YAML: "), str(err)
    assert err.file == str(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    err, path = fail(tmp_path, "- shards: 2\n- campaigns: []\n")
    assert str(err) == f"{path}: expected a mapping at the top level, got list"


@pytest.mark.parametrize("target", ['{stream: "s", webhook: "http://x/y"}', "{max_attempts: 3}"])
def test_target_needs_exactly_one_of_stream_or_webhook(tmp_path: Path, target: str) -> None:
    text = edit('{stream: "playbus:actions:lottery"}', target)
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "lottery: {"), "targets.lottery",
                   "exactly one of 'stream' or 'webhook'")


def test_webhook_must_be_http(tmp_path: Path) -> None:
    text = edit("http://127.0.0.1:9100/grant", "ftp://127.0.0.1/grant")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "wallet:"), "targets.wallet.webhook", "(got 'ftp://127.0.0.1/grant')")


def test_more_shards_than_key_groups(tmp_path: Path) -> None:
    text = edit("shards: 2", "shards: 32")
    err, path = fail(tmp_path, text)
    assert_message(err, path, 1, "shards", "at most key_groups (16)", "(got 32)")


def test_duplicate_campaign_id(tmp_path: Path) -> None:
    text = BASE + BASE[BASE.index("  - id: spring2026"):]
    err, path = fail(tmp_path, text)
    assert_message(err, path, 20, "campaigns[1].id", "campaign ids must be unique", "(got 'spring2026')")


def test_duplicate_yaml_key_is_refused_not_silently_overwritten(tmp_path: Path) -> None:
    # PyYAML would keep only the second `caps:`, silently dropping the first one's caps.
    text = edit("    budgets:\n", "    caps: []\n    budgets:\n")
    err, path = fail(tmp_path, text)
    assert_message(err, path, line_of(text, "caps: []"), "campaigns[0].caps", "appears twice")


def test_unreadable_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value).startswith(f"{missing}: cannot read config: ")


def test_config_error_pickles_with_message_file_and_path(tmp_path: Path) -> None:
    err, path = fail(tmp_path, edit("period: day", "period: month"))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ConfigError
    assert str(back) == str(err) == back.message
    assert back.file == str(path)
    assert back.path == "campaigns[0].caps[0].period"
