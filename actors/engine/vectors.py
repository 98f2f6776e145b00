"""Script test vectors: `scripts/NAME.test.yaml` beside a rule's script `scripts/NAME.lua`, run in-process.

A vector file lists cases; each case runs its events through a fresh ShardEngine of the whole configuration (so
every rule on those event types runs, as in production) with LocalRun (sends decided in-process, timers fired by
the events' clock, then up to `until`), and compares what was granted and the contexts left with what it expects:

```yaml
cases:
  - name: first answer grants a chance
    context: {}                    # optional: the starting context of every user the case reaches
    contexts: {u2: {a: 1}}         # optional: the starting context of given users (over `context`)
    events:                        # id defaults to e1, e2...; campaign to the config's only campaign;
      - {user: u1, type: quiz.answered, ts: 1769000000000, data: {}}  # ts: ms or "2026-01-21T10:00:00+08:00"
    until: 2026-01-23T00:00:00+08:00   # optional: fire the timers due by then at the end (default: all set)
    expect:
      actions: [{type: lottery.grant_chance, params: {chances: 1}}]   # default []: none
      context: {quiz.answered: 1}  # optional: the whole context of the events' user after the case
      contexts: {u2: {...}}        # optional: the whole context of given users (when several are involved)
      errors: ["budget"]           # default []: substrings of the errors (rule errors, rejections), in order
```

Actions are every action granted in the case (by the input events and the events rules made, in the order they
were decided; a `duplicate` repeats actions without granting them, so it adds none), compared in order by `type`
and by the `params` listed (keys not listed are not compared; an action without `params` is compared by type),
and by `user` when given. Contexts are compared whole. Pure: no Redis, no Ray.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.local import LocalRun, Step
from playbus.config.errors import ConfigError
from playbus.config.loader import field_path, line_of, read_yaml
from playbus.config.schema import Config
from playbus.scripting.errors import ScriptError

__all__ = [
    "SUFFIX",
    "Case",
    "CaseResult",
    "ExpectedAction",
    "VectorError",
    "load_vectors",
    "parse_vectors",
    "run_case",
    "run_vectors",
    "script_names",
    "vector_failures",
    "vector_path",
]

SUFFIX = ".test.yaml"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_STEPS = 10_000  # events decided in one case, made ones included: a rule that fans out without end fails


class VectorError(ConfigError):
    """A vector file cannot be used; the message names the file, line, case and field."""


@dataclass(frozen=True)
class ExpectedAction:
    type: str
    params: dict[str, Any] | None = None  # None: not compared
    user: str | None = None  # None: not compared


@dataclass
class Case:
    """One case of a vector file, checked and normalised (plain data: it pickles)."""

    name: str
    script: str
    file: str
    line: int
    campaign: str
    events: list[dict[str, Any]]
    context: dict[str, Any] | None = None  # the starting context of every user reached
    contexts: dict[str, dict[str, Any]] = field(default_factory=dict)  # starting contexts by user
    until: int | None = None
    actions: list[ExpectedAction] = field(default_factory=list)
    expect_contexts: dict[str, dict[str, Any]] = field(default_factory=dict)  # whole contexts after, by user
    errors: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class CaseResult:
    """A case run: `diff` is "" when it passed, else a readable account of what differed (several lines)."""

    name: str
    script: str
    ok: bool
    diff: str = ""
    where: str = ""


# -- finding and reading vector files ---------------------------------------------------------------------------
def _script_paths(config: Config) -> dict[str, Path]:
    """Script name -> its file, for every rule of the config (in config order)."""
    base = Path(config.source_file).parent if config.source_file else Path.cwd()
    out: dict[str, Path] = {}
    for camp in config.campaigns:
        for rule in camp.rules:
            path = (base / rule.script).resolve()
            out.setdefault(rule.script_name or path.stem, path)
    return out


def script_names(config: Config) -> list[str]:
    """The names of the scripts the config's rules run, in config order."""
    return list(_script_paths(config))


def vector_path(config: Config, name: str) -> Path | None:
    """Where script `name`'s vectors are (`NAME.test.yaml` in its script's folder), or None when the config runs
    no script of that name. The file may not exist."""
    path = _script_paths(config).get(name)
    return path.with_name(name + SUFFIX) if path is not None else None


def load_vectors(config: Config, names: Iterable[str] | None = None) -> dict[str, list[Case]]:
    """The cases of every script of the config that has a vector file (or of `names` only); raises VectorError
    for a file that cannot be read or is not a valid vector file."""
    wanted = set(names) if names is not None else None
    out: dict[str, list[Case]] = {}
    for name, script in _script_paths(config).items():
        if wanted is not None and name not in wanted:
            continue
        path = script.with_name(name + SUFFIX)
        if not path.is_file():
            continue
        shown = _shown(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise VectorError(f"{shown}: cannot read test vectors: {getattr(e, 'strerror', None) or e}",
                              file=shown) from None
        out[name] = parse_vectors(text, config, name, shown)
    return out


def _shown(path: Path) -> str:
    """A path as messages show it: relative to the current folder when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class _File:
    """Errors of one vector file, with the line and path of the field at fault."""

    def __init__(self, file: str, root: yaml.Node | None, data: Any) -> None:
        self.file, self.root, self.data = file, root, data

    def fail(self, loc: tuple[Any, ...], msg: str, case: str | None = None) -> VectorError:
        line = line_of(self.root, loc)
        where = f"{self.file}:{line}" if line else self.file
        found, value = True, self.data
        for part in loc:
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                found = False
                break
        got = f" (got {value!r})" if found and not isinstance(value, (dict, list)) else ""
        path = field_path(loc)
        named = f"case {case!r}: " if case else ""
        return VectorError(f"{where}: {named}{path}: {msg}{got}", file=self.file, path=path)


def parse_vectors(text: str, config: Config, script: str, file: str = "<vectors>") -> list[Case]:
    """The cases of a vector file's text, checked against the config (its campaigns); raises VectorError."""
    try:
        root, data = read_yaml(text, file, text_dates=True)
    except ConfigError as e:
        raise VectorError(e.message, file=file, path=e.path) from None
    f = _File(file, root, data)
    if not isinstance(data, dict):
        raise f.fail((), f"expected a mapping with `cases:`, got {type(data).__name__}")
    for k in data:
        if k != "cases":
            raise f.fail((k,), "unknown field (typo?); a vector file has `cases:` only")
    cases = data.get("cases")
    if not isinstance(cases, list):
        raise f.fail(("cases",), "expected a list of cases")
    out: list[Case] = []
    names: set[str] = set()
    for i, raw in enumerate(cases):
        case = _parse_case(f, config, script, ("cases", i), raw)
        if case.name in names:
            raise f.fail(("cases", i, "name"), "two cases have this name", case.name)
        names.add(case.name)
        out.append(case)
    return out


_Fail = Callable[[tuple[Any, ...], str], VectorError]  # (path in the case, message) -> the error to raise
_CASE_KEYS = {"name", "context", "contexts", "events", "until", "expect"}
_EVENT_KEYS = {"id", "campaign", "user", "type", "ts", "data"}
_EXPECT_KEYS = {"actions", "context", "contexts", "errors"}
_ACTION_KEYS = {"type", "params", "user"}


def _parse_case(f: _File, config: Config, script: str, loc: tuple[Any, ...], raw: Any) -> Case:
    if not isinstance(raw, dict):
        raise f.fail(loc, "expected a case: a mapping with name, events and expect")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise f.fail((*loc, "name"), "required: a non-empty string naming the case")
    for k in raw:
        if k not in _CASE_KEYS:
            raise f.fail((*loc, k), f"unknown field (typo?); known: {', '.join(sorted(_CASE_KEYS))}", name)

    def fail(sub: tuple[Any, ...], msg: str) -> VectorError:
        return f.fail((*loc, *sub), msg, name)

    line = line_of(f.root, loc) or 0
    events = raw.get("events")
    if not isinstance(events, list) or not events:
        raise fail(("events",), "required: a non-empty list of events")
    only = config.campaigns[0].id if len(config.campaigns) == 1 else None
    known = [c.id for c in config.campaigns]
    evs: list[dict[str, Any]] = []
    for j, e in enumerate(events):
        at = ("events", j)
        if not isinstance(e, dict):
            raise fail(at, "expected an event: a mapping with user, type and ts")
        for k in e:
            if k not in _EVENT_KEYS:
                raise fail((*at, k), f"unknown field (typo?); an event has {', '.join(sorted(_EVENT_KEYS))}")
        ev = dict(e)
        ev.setdefault("id", f"e{j + 1}")
        if "campaign" not in ev:
            if only is None:
                raise fail((*at, "campaign"), f"required: the config has several campaigns ({', '.join(known)})")
            ev["campaign"] = only
        elif ev["campaign"] not in known:
            raise fail((*at, "campaign"), f"unknown campaign (known: {', '.join(known) or 'none'})")
        for k in ("id", "user", "type"):
            if not isinstance(ev.get(k), str) or not ev[k]:
                raise fail((*at, k), "required: a non-empty string")
        if "ts" not in ev:
            raise fail((*at, "ts"), "required: the event time, ms since the epoch or an ISO-8601 time with offset")
        ts = _time(ev["ts"])
        if ts is None:
            raise fail((*at, "ts"), "expected ms since the epoch or an ISO-8601 time with its offset "
                                    "(2026-01-21T10:00:00+08:00)")
        ev["ts"] = ts
        if ev.get("data") is not None and not isinstance(ev["data"], dict):
            raise fail((*at, "data"), "expected a mapping")
        evs.append(ev)
    campaigns = {e["campaign"] for e in evs}
    if len(campaigns) > 1:
        raise fail(("events",), f"the events of one case are of one campaign (got {', '.join(sorted(campaigns))})")
    context = raw.get("context")
    if context is not None:
        _check_context(fail, ("context",), context)
    contexts = _user_contexts(fail, ("contexts",), raw.get("contexts"))
    until = None
    if raw.get("until") is not None:
        until = _time(raw["until"])
        if until is None:
            raise fail(("until",), "expected ms since the epoch or an ISO-8601 time with its offset")
    expect = raw.get("expect")
    if not isinstance(expect, dict):
        raise fail(("expect",), "required: a mapping of actions, context, contexts and errors")
    for k in expect:
        if k not in _EXPECT_KEYS:
            raise fail(("expect", k), f"unknown field (typo?); known: {', '.join(sorted(_EXPECT_KEYS))}")
    actions = _actions(fail, expect.get("actions"))
    expect_contexts = _user_contexts(fail, ("expect", "contexts"), expect.get("contexts"))
    if expect.get("context") is not None:
        _check_context(fail, ("expect", "context"), expect["context"])
        users = list(dict.fromkeys(e["user"] for e in evs))
        if len(users) > 1:
            raise fail(("expect", "context"), f"the events are of several users ({', '.join(users)}): "
                                              "give `contexts: {user: {...}}` instead")
        if users[0] in expect_contexts:
            raise fail(("expect", "contexts", users[0]), "also given by `context`: give it once")
        expect_contexts = {users[0]: expect["context"], **expect_contexts}
    errors = expect.get("errors", [])
    if not isinstance(errors, list) or not all(isinstance(x, str) for x in errors):
        raise fail(("expect", "errors"), "expected a list of strings (parts of the errors expected, in order)")
    return Case(name=name, script=script, file=f.file, line=line, campaign=evs[0]["campaign"], events=evs,
                context=context, contexts=contexts, until=until, actions=actions, expect_contexts=expect_contexts,
                errors=list(errors))


def _check_context(fail: _Fail, loc: tuple[Any, ...], value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise fail(loc, "expected a context: a mapping with string keys")


def _user_contexts(fail: _Fail, loc: tuple[Any, ...], value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(loc, "expected a mapping of user -> context")
    for user, ctx in value.items():
        if not isinstance(user, str) or not user:
            raise fail(loc, f"expected user ids as keys, got {user!r}")
        _check_context(fail, (*loc, user), ctx)
    return dict(value)


def _actions(fail: _Fail, value: Any) -> list[ExpectedAction]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise fail(("expect", "actions"), "expected a list of actions ({type, params})")
    out = []
    for i, a in enumerate(value):
        at = ("expect", "actions", i)
        if not isinstance(a, dict):
            raise fail(at, "expected an action: a mapping with type and params")
        for k in a:
            if k not in _ACTION_KEYS:
                raise fail((*at, k), f"unknown field (typo?); an action has {', '.join(sorted(_ACTION_KEYS))}")
        if not isinstance(a.get("type"), str) or not a["type"]:
            raise fail((*at, "type"), "required: the action type (gameplay.verb)")
        params = a.get("params")
        if params is not None and not isinstance(params, dict):
            raise fail((*at, "params"), "expected a mapping (the params compared; others are not)")
        user = a.get("user")
        if user is not None and not isinstance(user, str):
            raise fail((*at, "user"), "expected a user id")
        out.append(ExpectedAction(a["type"], params, user))
    return out


def _time(value: Any) -> int | None:
    """ms since the epoch, given as such or as an ISO-8601 time with its offset; None when neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        try:
            t = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
        if t.tzinfo is None:
            return None
        return (t - _EPOCH) // timedelta(milliseconds=1)
    return None


# -- running ----------------------------------------------------------------------------------------------------
def run_case(config: Config, case: Case, source: str | None = None,
             scripts: Iterable[Mapping[str, Any]] = ()) -> CaseResult:
    """Run one case in a fresh engine, with `source` as its script (default: the script file) and `scripts` the
    stored versions of the others (as ShardEngine takes them; default: their files)."""
    result = CaseResult(case.name, case.script, False, where=case.where)
    catalog = [s for s in scripts if s["name"] != case.script or source is None]
    if source is not None:
        catalog.append({"name": case.script, "active": 1, "versions": {1: source}})
    try:
        engine = ShardEngine(config, scripts=catalog)
    except ScriptError as e:
        result.diff = f"the script does not compile: {e}"
        return result
    for user, ctx in case.contexts.items():
        engine.start_users([{"campaign": case.campaign, "user": user}], ctx)
    run = LocalRun(engine, case.events[0]["ts"], case.context, max_steps=MAX_STEPS)
    steps: list[Step] = []
    try:
        for ev in case.events:
            steps += run.event(dict(ev))
        steps += run.finish(case.until)
    except Exception as e:  # noqa: BLE001 - a run that cannot finish fails its case, with why
        result.diff = f"the run stopped: {type(e).__name__}: {e}"
        return result
    granted = [a for s in steps if s.result["status"] != "duplicate" for a in s.result["actions"]]
    errors = [str(x) for s in steps for x in s.result["errors"]]
    got_contexts = {u: engine.context(case.campaign, u) for u in case.expect_contexts}
    parts: list[str] = []
    if not (len(granted) == len(case.actions) and all(map(_action_matches, case.actions, granted))):
        parts += _diff("actions", [_show_expected(a) for a in case.actions],
                       [_show_got(a, case.actions[i] if i < len(case.actions) else None)
                        for i, a in enumerate(granted)])
    for user, want in case.expect_contexts.items():
        got = got_contexts[user]
        if not _same(want, got):
            parts += _diff(f"context of {user}", _pretty(want), _pretty(got))
    if not (len(errors) == len(case.errors) and all(w in g for w, g in zip(case.errors, errors, strict=False))):
        parts.append("errors (expected: parts of them, in order; got):")
        parts += [f"  - {json.dumps(w, ensure_ascii=False)}" for w in case.errors] or ["  - (none)"]
        parts += [f"  + {json.dumps(g, ensure_ascii=False)}" for g in errors] or ["  + (none)"]
    elif errors and parts:
        parts.append("errors (as expected):")
        parts += [f"    {json.dumps(g, ensure_ascii=False)}" for g in errors]
    result.ok = not parts
    result.diff = "\n".join(parts)
    return result


def run_vectors(config: Config, name: str, source: str | None = None, vectors: Mapping[str, list[Case]] | None = None,
                scripts: Iterable[Mapping[str, Any]] = ()) -> list[CaseResult]:
    """Run script `name`'s cases (from `vectors`, by default read now from its vector file), with `source` as its
    script when given; [] when it has none. Raises VectorError for a bad vector file."""
    cases = (vectors if vectors is not None else load_vectors(config, [name])).get(name, [])
    catalog = list(scripts)
    return [run_case(config, c, source, catalog) for c in cases]


def vector_failures(config: Config, name: str, source: str | None = None,
                    vectors: Mapping[str, list[Case]] | None = None,
                    scripts: Iterable[Mapping[str, Any]] = ()) -> list[str]:
    """Readable failures of script `name`'s vectors run with `source` (each names the case and says what
    differed); [] when they all pass or there are none. A vector file that cannot be used is a failure too."""
    try:
        results = run_vectors(config, name, source, vectors, scripts)
    except VectorError as e:
        return [str(e)]
    return [f"{r.where}: case {r.name!r} failed:\n{r.diff}" for r in results if not r.ok]


# -- comparing and showing --------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    """Equal as data: True is not 1, 1 is 1.0, mappings and lists compared deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _action_matches(want: ExpectedAction, got: dict[str, Any]) -> bool:
    if want.type != got["type"] or (want.user is not None and want.user != got["user"]):
        return False
    params = got.get("params") or {}
    return want.params is None or all(k in params and _same(v, params[k]) for k, v in want.params.items())


def _show_expected(a: ExpectedAction) -> str:
    out: dict[str, Any] = {"type": a.type}
    if a.user is not None:
        out["user"] = a.user
    if a.params is not None:
        out["params"] = _sorted(a.params)
    return json.dumps(out, ensure_ascii=False, default=str)


def _show_got(a: dict[str, Any], want: ExpectedAction | None) -> str:
    """A granted action as its expectation shows it (only the params it lists, the user if it names one), so that
    the diff marks what differs; an action with nothing expected of it in full."""
    params = a.get("params") or {}
    out: dict[str, Any] = {"type": a["type"]}
    if want is not None and want.type == a["type"]:
        if want.user is not None:
            out["user"] = a["user"]
        if want.params is not None:
            out["params"] = _sorted({k: params[k] for k in want.params if k in params})
    else:
        out["user"] = a["user"]
        out["params"] = _sorted(params)
    return json.dumps(out, ensure_ascii=False, default=str)


def _sorted(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in sorted(d, key=str)}


def _pretty(value: Any) -> list[str]:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, indent=2, default=str).splitlines()


def _diff(label: str, expected: list[str], got: list[str]) -> list[str]:
    lines = list(difflib.unified_diff(expected, got, lineterm="", n=max(len(expected), len(got))))
    body = [ln for ln in lines[2:] if not ln.startswith("@@")]  # no ---/+++ header, one hunk
    if not body:  # equal as text, different as data (1 and true, 1 and "1" print alike only in YAML)
        body = [f"-{ln}" for ln in expected] + [f"+{ln}" for ln in got]
    return [f"{label} (- expected, + got):"] + [f"  {ln}" for ln in body]
