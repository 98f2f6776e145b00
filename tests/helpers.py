"""Shared test helpers: build a config and an engine from a YAML string and inline Lua scripts."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from playbus.actors.engine.engine import ShardEngine
from playbus.config.loader import parse_config
from playbus.config.schema import Config

T0 = 1769000000000  # 2026-01-21T12:53:20Z, inside the campaigns below

# CONTRACT's example rule: the first quiz answer grants one lottery chance.
FIRST_QUIZ = """
function decide(event, ctx)
  local n = ctx:incr("quiz.answered", 1)
  if n == 1 then emit("lottery.grant_chance", {chances = 1}) end
end
"""

BASE_YAML = """
targets:
  lottery: {stream: "playbus:actions:lottery"}
  wallet: {webhook: "http://127.0.0.1:9100/grant"}
campaigns:
  - id: c1
    timezone: Asia/Shanghai
    starts: 2026-01-20T00:00:00+08:00
    ends: 2026-02-20T00:00:00+08:00
    rules:
RULES
    caps:
CAPS
    budgets:
BUDGETS
"""


def make_config(
    tmp: Path,
    scripts: dict[str, str],
    rules: list[dict[str, Any]],
    caps: list[str] | None = None,
    budgets: list[str] | None = None,
    extra: str = "",
) -> Config:
    """rules: [{id, on, script (name without .lua), emits: [...]}]; caps/budgets: YAML flow mappings."""
    for name, src in scripts.items():
        (tmp / f"{name}.lua").write_text(textwrap.dedent(src), encoding="utf-8")
    rule_lines = "\n".join(
        f"      - {{id: {r['id']}, on: {r['on']}, script: {r['script']}.lua, emits: [{', '.join(r.get('emits', []))}]}}"
        for r in rules
    )
    text = BASE_YAML.replace("RULES", rule_lines or "      []")
    text = text.replace("CAPS", "\n".join(f"      - {c}" for c in caps or []) or "      []")
    text = text.replace("BUDGETS", "\n".join(f"      - {b}" for b in budgets or []) or "      []")
    return parse_config(extra + text, file=str(tmp / "test.yaml"), base_dir=tmp)


def make_engine(tmp: Path, scripts: dict[str, str], rules: list[dict[str, Any]], **kw: Any) -> ShardEngine:
    return ShardEngine(make_config(tmp, scripts, rules, **kw))


def ev(
    i: int | str, user: str = "u1", type: str = "quiz.answered", ts: int | None = None, **data: Any
) -> dict[str, Any]:
    e: dict[str, Any] = {"id": f"e{i}", "campaign": "c1", "user": user, "type": type, "ts": T0 if ts is None else ts}
    if data:
        e["data"] = data
    return e


def quiz_config(tmp: Path, extra: str = "shards: 2\nkey_groups: 16\n") -> Config:
    """A campaign with the one FIRST_QUIZ rule (named `quiz`), for integration tests."""
    return make_config(tmp, {"quiz": FIRST_QUIZ},
                       [{"id": "quiz", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]}],
                       extra=extra)
