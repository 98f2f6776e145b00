"""Load and validate a playbus YAML file.

Every mistake names the file, line, field path, value and expectation.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from playbus.config.errors import ConfigError
from playbus.config.schema import BudgetConfig, CampaignConfig, CapConfig, Config, FieldCheckError

__all__ = ["default_config_path", "field_path", "line_of", "load_config", "no_duplicate_keys", "parse_campaign",
           "parse_config", "read_yaml", "with_campaigns"]


class _Loader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]
    """SafeLoader where only true/false are booleans: YAML 1.1 would read a bare `on:` key as True."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


class _TextDatesLoader(_Loader):  # type: ignore[misc, unused-ignore]
    """_Loader where dates and times stay strings (`2026-01-21` is the string a script writes)."""


_TextDatesLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in _Loader.yaml_implicit_resolvers.items()
}


def read_yaml(text: str, file: str, text_dates: bool = False) -> tuple[yaml.Node | None, Any]:
    """(node tree, data) of YAML text, with only true/false as booleans (and, with `text_dates`, dates kept as
    strings); ConfigError naming the file and line when it is not YAML, or a mapping repeats a key."""
    loader = _TextDatesLoader if text_dates else _Loader
    try:
        root = yaml.compose(text, Loader=loader)
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else file
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}", file=file) from None
    no_duplicate_keys(file, root)
    return root, data


def field_path(loc: tuple[Any, ...]) -> str:
    """A field's path as messages show it: campaigns[0].rules[1].emits."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at `loc`, or of its nearest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            # The key's line: a block value (a list under `caps:`) starts on the line after it.
            pair = next(((k, v) for k, v in node.value if k.value == part), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _value_at(data: Any, loc: tuple[Any, ...]) -> tuple[bool, Any]:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, data


def _fail(file: str, root: yaml.Node | None, data: Any, loc: tuple[Any, ...], msg: str) -> ConfigError:
    line = line_of(root, loc)
    where = f"{file}:{line}" if line else file
    found, value = _value_at(data, loc)
    if isinstance(value, date):  # YAML timestamps arrive as datetime objects; show them as written
        value = value.isoformat()
    got = f" (got {value!r})" if found and not isinstance(value, (dict, list)) else ""
    path = field_path(loc)
    return ConfigError(f"{where}: {path}: {msg}{got}", file=file, path=path)


def parse_config(text: str, file: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate YAML text; rule scripts are read relative to `base_dir` (the file's folder)."""
    root, data = read_yaml(text, file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{file}: expected a mapping at the top level, got {type(data).__name__}", file=file
        )
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise _fail(file, root, data, *_first_error(e)) from None
    return _check_links(cfg, file, root, data, base_dir or Path.cwd())


def no_duplicate_keys(file: str, node: yaml.Node | None) -> None:
    """PyYAML keeps the last of two equal keys: a second `caps:` would silently drop the first one's caps."""
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(node, ())] if node is not None else []
    visited: set[int] = set()  # aliases share nodes, and may even be recursive
    while stack:
        n, loc = stack.pop()
        if id(n) in visited:
            continue
        visited.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen: set[Any] = set()
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        path = field_path((*loc, k.value))
                        raise ConfigError(
                            f"{file}:{k.start_mark.line + 1}: {path}: this key appears twice in one mapping "
                            f"(the earlier value would be ignored)", file=file, path=path,
                        )
                    seen.add(k.value)
                    stack.append((v, (*loc, k.value)))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend((v, (*loc, i)) for i, v in enumerate(n.value))


def _first_error(e: ValidationError) -> tuple[tuple[Any, ...], str]:
    """(the path of the field, what was expected) of a validation's first error."""
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldCheckError):  # a cross-field check that names the field it is about
        loc += cause.loc
    return loc, _expectation(err)


def _expectation(err: Any) -> str:
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "extra_forbidden":
        return "unknown field (typo?)"
    if err.get("type") == "missing":
        return "required field is missing"
    return msg.removeprefix("Value error, ")


def _check_links(cfg: Config, file: str, root: yaml.Node | None, data: Any, base: Path) -> Config:
    """Cross-field checks: emitted types have a target, caps/budgets name emitted types, scripts exist, and two
    different script files never share a name (the file stem names a script in the catalog)."""
    campaigns = []
    stems: dict[str, Path] = {}
    for ci, camp in enumerate(cfg.campaigns):
        emitted = {t for r in camp.rules for t in r.emits}
        rules = []
        for ri, rule in enumerate(camp.rules):
            for ei, t in enumerate(rule.emits):
                gameplay = t.split(".", 1)[0]
                if gameplay not in cfg.targets:
                    raise _fail(
                        file, root, data, ("campaigns", ci, "rules", ri, "emits", ei),
                        f"no target for gameplay {gameplay!r}; add it under 'targets' "
                        f"(known: {sorted(cfg.targets) or 'none'})",
                    )
            path = (base / rule.script).resolve()
            other = stems.setdefault(path.stem, path)
            if other != path:
                raise _fail(
                    file, root, data, ("campaigns", ci, "rules", ri, "script"),
                    f"script name {path.stem!r} (the file stem) is already the name of {str(other)!r}; "
                    f"two different files cannot share a name: rename one",
                )
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise _fail(
                    file, root, data, ("campaigns", ci, "rules", ri, "script"),
                    f"cannot read script {str(path)!r}: {getattr(e, 'strerror', None) or e}",
                ) from None
            rules.append(rule.model_copy(update={"script_name": path.stem, "source": source}))
        limits: tuple[tuple[str, tuple[CapConfig | BudgetConfig, ...]], ...] = (
            ("caps", camp.caps), ("budgets", camp.budgets),
        )
        for key, items in limits:
            for i, item in enumerate(items):
                if item.action not in emitted:
                    raise _fail(
                        file, root, data, ("campaigns", ci, key, i, "action"),
                        f"no rule of this campaign emits {item.action!r} "
                        f"(emitted: {sorted(emitted) or 'none'})",
                    )
        campaigns.append(camp.model_copy(update={"rules": tuple(rules)}))
    return cfg.model_copy(update={"campaigns": tuple(campaigns), "source_file": file})


def parse_campaign(doc: Any, config: Config, scripts: dict[str, str]) -> CampaignConfig:
    """Validate one campaign given as data (the shape of one `campaigns` item, as the admin API takes it), its
    rules' `script` naming a script of the catalog (`scripts`: name -> active source). Raises ConfigError whose
    `path` names the bad field (e.g. "rules[0].emits[1]"); checked like a file's campaign (targets of emitted
    types, caps and budgets of emitted types)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"(top level): expected a campaign object, got {type(doc).__name__}", path="(top level)")
    try:
        camp = CampaignConfig.model_validate(doc)
    except ValidationError as e:
        raise _fail_doc(doc, *_first_error(e)) from None
    emitted = {t for r in camp.rules for t in r.emits}
    rules = []
    for ri, rule in enumerate(camp.rules):
        for ei, t in enumerate(rule.emits):
            if t.split(".", 1)[0] not in config.targets:
                raise _fail_doc(doc, ("rules", ri, "emits", ei), f"no target for gameplay {t.split('.', 1)[0]!r} "
                                                                 f"(targets: {sorted(config.targets) or 'none'})")
        if rule.script not in scripts:
            raise _fail_doc(doc, ("rules", ri, "script"), "no script of that name in the catalog (push it first: "
                                                          "PUT /v1/scripts/{name})")
        rules.append(rule.model_copy(update={"script_name": rule.script, "source": scripts[rule.script]}))
    limits: tuple[tuple[str, tuple[CapConfig | BudgetConfig, ...]], ...] = (("caps", camp.caps),
                                                                            ("budgets", camp.budgets))
    for key, items in limits:
        for i, item in enumerate(items):
            if item.action not in emitted:
                raise _fail_doc(doc, (key, i, "action"), f"no rule of this campaign emits {item.action!r} "
                                                         f"(emitted: {sorted(emitted) or 'none'})")
    return camp.model_copy(update={"rules": tuple(rules)})


def with_campaigns(config: Config, docs: dict[str, Any], scripts: dict[str, str]) -> Config:
    """`config` with its campaigns as `docs` says (campaign id -> document, the running configuration kept in
    Redis): the file's campaigns in file order, then the ones created through the API, by id."""
    order = [c.id for c in config.campaigns] + sorted(set(docs) - {c.id for c in config.campaigns})
    by_id = {c.id: c for c in config.campaigns}
    campaigns = [parse_campaign(docs[cid], config, scripts) if cid in docs else by_id[cid] for cid in order]
    return config.model_copy(update={"campaigns": tuple(campaigns)})


def _fail_doc(doc: Any, loc: tuple[Any, ...], msg: str) -> ConfigError:
    found, value = _value_at(doc, loc)
    got = f" (got {value!r})" if found and not isinstance(value, (dict, list)) else ""
    path = field_path(loc)
    return ConfigError(f"{path}: {msg}{got}", path=path)


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError with a message for an operator."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(f"{p}: cannot read config: {reason}", file=str(p)) from None
    return parse_config(text, file=str(p), base_dir=p.parent)


def default_config_path() -> Path:
    """config/example.yaml of the current folder (a checkout), else the example shipped in the package."""
    here = Path("config/example.yaml")
    if here.is_file():
        return here
    return Path(__file__).resolve().parent / "example.yaml"
