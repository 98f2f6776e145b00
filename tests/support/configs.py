"""One builder for the test configs: rules with their Lua inline, caps, budgets and settings, written as a YAML
file beside its scripts and loaded as playbus loads any config (so tests exercise the real loader)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import yaml

from playbus.actors.engine.engine import ShardEngine
from playbus.config.loader import load_config
from playbus.config.schema import Config

T0 = 1769000000000  # 2026-01-21T12:53:20Z (20:53:20 in Shanghai), inside the default campaign window
LOTTERY = "playbus:actions:lottery"
TARGETS: dict[str, Any] = {
    "lottery": {"stream": LOTTERY},
    "wallet": {"webhook": "http://127.0.0.1:9/grant"},
}

# CONTRACT's example rule: the first quiz answer grants one lottery chance.
FIRST_QUIZ = """
function decide(event, ctx)
  local n = ctx:incr("quiz.answered", 1)
  if n == 1 then emit("lottery.grant_chance", {chances = 1}) end
end
"""


def config_document(
    rules: list[dict[str, Any]],
    caps: list[dict[str, Any]] | None = None,
    budgets: list[dict[str, Any]] | None = None,
    *,
    campaign: str = "c1",
    timezone: str = "Asia/Shanghai",
    starts: str = "2026-01-20T00:00:00+08:00",
    ends: str = "2026-02-20T00:00:00+08:00",
    targets: dict[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """The config as data. rules: [{id, on, script (file stem), emits}]; settings: shards, key_groups, batch..."""
    camp: dict[str, Any] = {"id": campaign, "timezone": timezone, "starts": starts, "ends": ends,
                            "rules": [{**r, "script": f"{r['script']}.lua", "emits": list(r.get("emits", ()))}
                                      for r in rules]}
    if caps:
        camp["caps"] = caps
    if budgets:
        camp["budgets"] = budgets
    return {**settings, "targets": TARGETS if targets is None else targets, "campaigns": [camp]}


def write_config(folder: Path, scripts: dict[str, str], rules: list[dict[str, Any]], name: str = "config.yaml",
                 **kw: Any) -> Path:
    """Write the scripts (NAME.lua) and the YAML into `folder`; the YAML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, source in scripts.items():
        (folder / f"{stem}.lua").write_text(textwrap.dedent(source), encoding="utf-8")
    path = folder / name
    path.write_text(yaml.safe_dump(config_document(rules, **kw), sort_keys=False), encoding="utf-8")
    return path


def make_config(folder: Path, scripts: dict[str, str], rules: list[dict[str, Any]], **kw: Any) -> Config:
    """write_config, then load it."""
    return load_config(write_config(folder, scripts, rules, **kw))


def make_engine(folder: Path, scripts: dict[str, str], rules: list[dict[str, Any]], **kw: Any) -> ShardEngine:
    return ShardEngine(make_config(folder, scripts, rules, **kw))


def quiz_config(folder: Path, **settings: Any) -> Config:
    """A campaign with the one FIRST_QUIZ rule (named `quiz`), 2 shards over 16 key groups by default."""
    settings = {"shards": 2, "key_groups": 16, **settings}
    return make_config(folder, {"quiz": FIRST_QUIZ},
                       [{"id": "quiz", "on": "quiz.answered", "script": "quiz", "emits": ["lottery.grant_chance"]}],
                       **settings)


def ev(
    i: int | str, user: str = "u1", type: str = "quiz.answered", ts: int | None = None, **data: Any
) -> dict[str, Any]:
    e: dict[str, Any] = {"id": f"e{i}", "campaign": "c1", "user": user, "type": type, "ts": T0 if ts is None else ts}
    if data:
        e["data"] = data
    return e
