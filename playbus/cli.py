"""The `playbus` command: dry runs of the decision engine, and script operations over the admin API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from playbus.actors.engine.engine import ShardEngine
from playbus.actors.engine.local import LocalRun, Step
from playbus.actors.engine.vectors import SUFFIX, VectorError, load_vectors, run_case, script_names
from playbus.admin import add_scripts_parser, run_scripts_command
from playbus.admin_campaigns import add_audit_parser, add_campaigns_parser, run_audit_command, run_campaigns_command
from playbus.admin_dead import add_dead_parser, run_dead_command
from playbus.admin_failed import add_failed_parser, run_failed_command
from playbus.admin_shards import add_shards_parser, run_shards_command
from playbus.config.errors import ConfigError
from playbus.config.loader import default_config_path, load_config
from playbus.errors import CliError
from playbus.scripting.errors import ScriptError

__all__ = ["main"]


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
    if path == "-":
        yield from enumerate(sys.stdin, 1)
        return
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, 1)
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{path}: cannot read events: {getattr(e, 'strerror', None) or e}") from None


def _read_context(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{path}: cannot read context: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise CliError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise CliError(
            f"{path}: expected a JSON object (the starting context of every user), got {type(value).__name__}"
        )
    return value


def parse_time(text: str) -> int:
    """Milliseconds since the epoch, given as such or as an ISO-8601 time with its offset."""
    if text.strip().isdigit():
        return int(text)
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(f"--until: expected milliseconds since the epoch or an ISO-8601 time, got {text!r}") from None
    if t.tzinfo is None:
        raise CliError(f"--until: {text!r} has no time zone offset (e.g. 2026-02-01T00:00:00+08:00)")
    return int(t.timestamp() * 1000)


def dry_run(config_path: str, events_path: str, context_path: str | None, now_ms: int | None, out: TextIO,
            until: str | None = None) -> int:
    """Run every event through the whole engine in-process; one JSON line per event decided: the input events,
    the events their rules send (after the event that sent them) and the timers they set (fired by the events'
    clock, and at the end up to `until`: by default the last event's time plus the longest timer)."""
    try:
        cfg = load_config(config_path)
        engine = ShardEngine(cfg)
    except (ConfigError, ScriptError) as e:
        raise CliError(str(e)) from None
    start_ctx = _read_context(context_path)
    until_ms = parse_time(until) if until is not None else None
    now = int(time.time() * 1000) if now_ms is None else now_ms
    run = LocalRun(engine, now, start_ctx)

    def write(steps: list[Step]) -> None:
        for step in steps:
            out.write(json.dumps(step.line(), ensure_ascii=False, default=str) + "\n")

    for n, line in _read_lines(events_path):
        if not line.strip():
            continue
        try:
            raw: Any = json.loads(line)
        except json.JSONDecodeError as e:
            out.write(json.dumps({"id": None, "status": "rejected", "actions": [],
                                  "errors": [f"line {n}: not valid JSON: {e.msg}"], "context": None}) + "\n")
            continue
        write(run.event(raw))
    write(run.finish(until_ms))
    return 0


def check_vectors(config_path: str, script: str | None, source_path: str | None, out: TextIO) -> int:
    """Run the test vectors of every script of the config (or of `script`, with the source of `source_path` when
    given) in-process: one PASS/FAIL line per case, a diff under each failure. 0 when all pass (or there are
    none), 1 when a case fails; CliError (exit 2) for a bad config or vector file."""
    try:
        cfg = load_config(config_path)
        names = script_names(cfg)
        if source_path is not None and script is None:
            script = Path(source_path).stem
        if script is not None and script not in names:
            raise CliError(f"{config_path}: no rule runs a script named {script!r} (scripts: {', '.join(names)})")
        source = None
        if source_path is not None:
            try:
                source = Path(source_path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise CliError(f"{source_path}: cannot read script: {getattr(e, 'strerror', None) or e}") from None
        vectors = load_vectors(cfg, [script] if script is not None else None)
    except (ConfigError, VectorError, ScriptError) as e:
        raise CliError(str(e)) from None
    passed = failed = 0
    for name, cases in vectors.items():
        for case in cases:
            r = run_case(cfg, case, source if name == script else None)
            if r.ok:
                passed += 1
                out.write(f"PASS {name}: {r.name}\n")
                continue
            failed += 1
            out.write(f"FAIL {name}: {r.name}  ({r.where})\n")
            out.write("".join(f"    {line}\n" for line in r.diff.splitlines()))
    missing = [n for n in ([script] if script is not None else names) if n not in vectors]
    if not vectors:
        which = f"for script {script}" if script is not None else f"in {config_path}"
        out.write(f"no test vectors {which} (the vectors of a script NAME go in NAME{SUFFIX} beside it)\n")
        return 0
    note = f"; no vectors for {', '.join(missing)}" if missing else ""
    out.write(f"{passed} passed, {failed} failed ({len(vectors)} script{'s' if len(vectors) > 1 else ''}{note})\n")
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="playbus", description="playbus: the campaign orchestration engine")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dry-run", help="decide events in-process (no Ray, no Redis) and print the results")
    d.add_argument("--config", help="campaign config (default: config/example.yaml here, else the packaged example)")
    d.add_argument("--events", required=True, help="events, one JSON object per line ('-' for stdin)")
    d.add_argument("--context", help="JSON object: the starting context of every user the events touch")
    d.add_argument("--now", type=int, help="receive time in ms for events without ts (default: now)")
    d.add_argument("--until", help="fire the timers due by this time at the end (ms since the epoch or ISO-8601; "
                                   "default: the last event's time plus the longest timer set)")
    t = sub.add_parser("test", help="run the scripts' test vectors (scripts/NAME.test.yaml) in-process")
    t.add_argument("--config", help="campaign config (default: config/example.yaml here, else the packaged example)")
    t.add_argument("--script", help="only this script's vectors (a script name: its file stem)")
    t.add_argument("--source", help="a .lua file to test as the script (a candidate version; default name: its stem)")
    add_scripts_parser(sub)
    add_campaigns_parser(sub)
    add_dead_parser(sub)
    add_failed_parser(sub)
    add_audit_parser(sub)
    add_shards_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "dry-run":
            return dry_run(args.config or str(default_config_path()), args.events, args.context, args.now, sys.stdout,
                           args.until)
        if args.command == "test":
            return check_vectors(args.config or str(default_config_path()), args.script, args.source, sys.stdout)
        if args.command == "campaigns":
            return run_campaigns_command(args, sys.stdout)
        if args.command == "dead":
            return run_dead_command(args, sys.stdout)
        if args.command == "failed":
            return run_failed_command(args, sys.stdout)
        if args.command == "audit":
            return run_audit_command(args, sys.stdout)
        if args.command == "shards":
            return run_shards_command(args, sys.stdout)
        return run_scripts_command(args, sys.stdout)
    except CliError as e:
        print(f"playbus: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
