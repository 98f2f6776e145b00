"""`playbus scripts backtest`: a script's active version against a candidate, over the admin HTTP API.

    playbus scripts backtest NAME (--source FILE.lua | --version N) (--events FILE.jsonl | --last N)
                             [--campaign ID] [--json]

The server answers once the backtest is done (it cannot stream its progress): the command says what it started,
shows the time elapsed while it waits (on stderr), then prints a summary (or, with --json, the API's answer).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from playbus.errors import CliError

__all__ = ["add_backtest_args", "run_backtest"]

MAX_GIVEN = 1000  # events in a request (= the API's MAX_EVENTS)
MAX_LAST = 100_000  # recorded events one backtest may ask for
TIMEOUT_S = 900.0  # a backtest of 100,000 events takes seconds to a minute: far longer than other admin calls
TICK_S = 5.0  # how often the elapsed time is shown while waiting
SHOWN = 5  # changed events shown in the summary


def _last(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= n <= MAX_LAST:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_LAST}, got {n}")
    return n


def add_backtest_args(scripts_subparsers: Any) -> None:
    """`backtest` under `playbus scripts` (its subparsers, dest "op")."""
    b = scripts_subparsers.add_parser(
        "backtest", help="compare the active version with a candidate on recorded or given events (no side effect)")
    b.add_argument("name", help="the script")
    cand = b.add_mutually_exclusive_group(required=True)
    cand.add_argument("--source", metavar="FILE.lua", help="the candidate: a .lua file (not stored)")
    cand.add_argument("--version", type=int, metavar="N", help="the candidate: a stored version")
    what = b.add_mutually_exclusive_group(required=True)
    what.add_argument("--events", metavar="FILE.jsonl", help=f"events, one JSON object per line (at most {MAX_GIVEN})")
    what.add_argument("--last", type=_last, metavar="N",
                      help=f"the campaign's last N recorded events, from the journals (at most {MAX_LAST})")
    b.add_argument("--campaign", help="with --last: only this campaign's events (default: every campaign running "
                                      "the script)")
    b.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a summary")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def _events(path: str) -> list[Any]:
    events = []
    for n, line in enumerate(_read(path).splitlines(), 1):
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CliError(f"{path}:{n}: not valid JSON: {e.msg}") from None
    if not events:
        raise CliError(f"{path}: no events")
    if len(events) > MAX_GIVEN:
        raise CliError(f"{path}: {len(events)} events; at most {MAX_GIVEN} can be given (--last N backtests up to "
                       f"{MAX_LAST} recorded events)")
    return events


def _post(args: argparse.Namespace, path: str, body: bytes) -> Any:
    """POST JSON to the admin API, as playbus.admin.call_admin does, with a long timeout."""
    if not args.token:
        raise CliError("no admin token: set PLAYBUS_ADMIN_TOKEN or pass --token")
    req = urllib.request.Request(args.url.rstrip("/") + path, data=body, method="POST")
    req.add_header("Authorization", f"Bearer {args.token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=getattr(args, "timeout", None) or TIMEOUT_S) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        raise CliError(f"POST {path}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"cannot reach playbus at {args.url}: {getattr(e, 'reason', e)}") from None


def run_backtest(args: argparse.Namespace, out: TextIO, err: TextIO | None = None) -> int:
    """Run `playbus scripts backtest`; progress on `err` (default stderr), the result on `out`."""
    err = sys.stderr if err is None else err
    req: dict[str, Any] = {}
    if args.source:
        req["candidate"] = {"source": _read(args.source)}
        cand = f"the candidate {args.source}"
    else:
        req["candidate"] = {"version": args.version}
        cand = f"version {args.version}"
    if args.events:
        req["events"] = _events(args.events)
        what = f"{len(req['events'])} events of {args.events}"
    else:
        req["recorded"] = {"last": args.last}
        if args.campaign:
            req["recorded"]["campaign"] = args.campaign
        what = f"the last {args.last} recorded events" + (f" of {args.campaign}" if args.campaign else "")
    err.write(f"backtesting script {args.name}: the active version against {cand}, on {what} ...\n")
    err.flush()
    started = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(TICK_S):
            err.write(f"  ... {time.monotonic() - started:.0f} s\n")
            err.flush()

    ticker = threading.Thread(target=tick, name="backtest-progress", daemon=True)
    ticker.start()
    try:
        res = _post(args, f"/v1/scripts/{args.name}/backtest", json.dumps(req).encode())
    finally:
        done.set()
        ticker.join()
    elapsed = time.monotonic() - started
    n = res.get("events", 0) if isinstance(res, dict) else 0
    rate = f", {n / res['decide_seconds']:,.0f} events/s" if isinstance(res, dict) and res.get("decide_seconds") \
        else ""
    err.write(f"done in {elapsed:.1f} s ({n:,} events{rate})\n")
    err.flush()
    if args.json or not isinstance(res, dict):
        out.write(json.dumps(res, ensure_ascii=False, indent=2) + "\n")
    else:
        out.write(summary(res))
    return 0


def _signed(n: int) -> str:
    return f"+{n}" if n > 0 else str(n)


def _acts(actions: list[dict[str, Any]]) -> str:
    if not actions:
        return "(none)"
    return "; ".join(f"{a['type']} {json.dumps(a['params'], ensure_ascii=False, sort_keys=True)}" for a in actions)


def summary(res: dict[str, Any]) -> str:
    """A readable summary of a backtest's answer."""
    lines = []
    cv = res.get("candidate", {}).get("version")
    lines.append(f"script {res.get('script')}: active version {res.get('active', {}).get('version')} against "
                 f"{'the source given' if cv == 0 else f'version {cv}'}")
    n, changed = res.get("events", 0), res.get("changed", 0)
    rec = res.get("recorded")
    src = f" (the last {rec['found']} recorded of {', '.join(rec['campaigns'])})" if rec else ""
    lines.append(f"events:    {n}{src}, {res.get('users', 0)} users, {res.get('rejected', 0)} rejected")
    share = f" ({100 * changed / n:.1f}%)" if n else ""
    lines.append(f"changed:   {changed} events{share}")
    grants = res.get("grants", {})
    for kind, sign in (("added", "+"), ("removed", "-")):
        items = grants.get(kind) or {}
        text = ", ".join(f"{t} {sign}{c}" for t, c in items.items()) or "none"
        lines.append(f"{'grants ' + kind + ':':<16}{text}")
    spend = res.get("spend", {})
    budgets = res.get("budgets") or {}
    if budgets:
        parts = []
        for name, delta in budgets.items():
            per = [s[name] for s in spend.values() if name in s]
            detail = f" (active {sum(p['active'] for p in per)}, candidate {sum(p['candidate'] for p in per)})" \
                if per else ""
            parts.append(f"{name} {_signed(delta)}{detail}")
        lines.append("budgets:   " + ", ".join(parts))
    else:
        lines.append("budgets:   none spent")
    caps = res.get("caps") or {}
    if caps.get("users"):
        ex = ", ".join(f"{e['user']} ({', '.join(e['caps'])})" for e in caps.get("examples", []))
        lines.append(f"caps:      {caps['users']} users would hit a cap they do not hit now: {ex}"
                     + (" ..." if caps["users"] > len(caps.get("examples", [])) else ""))
    else:
        lines.append("caps:      no user would hit a cap they do not hit now")
    if caps.get("released"):
        lines.append(f"           {caps['released']} users hitting a cap now would not")
    errors = res.get("errors") or {}
    if errors.get("active") or errors.get("candidate"):
        lines.append(f"errors:    active {errors.get('active', 0)}, candidate {errors.get('candidate', 0)} failed runs")
    if res.get("effects_changed"):
        lines.append(f"effects:   {res['effects_changed']} events send or set timers differently (not followed)")
    start = res.get("starting_states") or {}
    if start.get("assumed_absent"):
        lines.append(f"note:      {start['assumed_absent']} context keys written in the window had no earlier value "
                     f"in the journal: taken as absent")
    examples = res.get("examples") or []
    if examples:
        lines.append(f"examples ({min(SHOWN, len(examples))} of {changed} changed):")
        for e in examples[:SHOWN]:
            ev = e["event"]
            who = f"{ev.get('campaign')}/{ev.get('user')}"
            lines.append(f"  {ev.get('id')}  {who}  {ev.get('type')}  ts {ev.get('ts')}")
            lines.append(f"    active:    {_acts(e['active'])}")
            lines.append(f"    candidate: {_acts(e['candidate'])}")
    lines.append(f"took {res.get('seconds', 0)} s")
    return "\n".join(lines) + "\n"
