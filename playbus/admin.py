"""`playbus scripts ...`: operators' script commands, spoken over the admin HTTP API."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from playbus.admin_backtest import add_backtest_args, run_backtest
from playbus.errors import CliError

__all__ = ["add_connection_args", "add_scripts_parser", "call_admin", "run_scripts_command"]


def add_connection_args(p: Any, json_flag: bool = False) -> None:
    """--url and --token of a command that speaks to the admin API (and --json to print its answer)."""
    p.add_argument("--url", default=os.environ.get("PLAYBUS_URL", "http://127.0.0.1:8000"),
                   help="playbus HTTP address (default: $PLAYBUS_URL or %(default)s)")
    p.add_argument("--token", default=os.environ.get("PLAYBUS_ADMIN_TOKEN"),
                   help="admin token (default: $PLAYBUS_ADMIN_TOKEN)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the API's JSON answer")


def add_scripts_parser(sub: Any) -> None:
    s = sub.add_parser("scripts", help="push, activate, list, show and dry-run scripts on a running playbus")
    add_connection_args(s)
    ops = s.add_subparsers(dest="op", required=True)
    p = ops.add_parser("push", help="upload a new version of a script from a .lua file")
    p.add_argument("file")
    p.add_argument("--name", help="script name (default: the file stem)")
    a = ops.add_parser("activate", help="make a version the one every shard runs (or, with --percent, a canary)")
    a.add_argument("name")
    a.add_argument("version", type=int)
    a.add_argument("--percent", type=float, default=100,
                   help="run it for this share of the users only (a canary, stable per user); 100 ends a canary")
    ops.add_parser("list", help="list scripts")
    sh = ops.add_parser("show", help="versions, active version and source of a script")
    sh.add_argument("name")
    add_backtest_args(ops)
    d = ops.add_parser("dry-run", help="run events through a script version without any side effect")
    d.add_argument("name")
    d.add_argument("--events", required=True, help="events, one JSON object per line")
    d.add_argument("--version", type=int, help="version to run (default: the active one)")
    d.add_argument("--source", help="a .lua file to run instead of a stored version")
    d.add_argument("--context", help="JSON object: the starting context")


def call_admin(args: argparse.Namespace, method: str, path: str, body: bytes | None, ctype: str) -> Any:
    if not args.token:
        raise CliError("no admin token: set PLAYBUS_ADMIN_TOKEN or pass --token")
    req = urllib.request.Request(args.url.rstrip("/") + path, data=body, method=method)
    req.add_header("Authorization", f"Bearer {args.token}")
    if body is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raise CliError(f"{method} {path}: HTTP {e.code}: {_readable(e.read())}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"cannot reach playbus at {args.url}: {getattr(e, 'reason', e)}") from None


def _readable(body: bytes) -> str:
    """An error answer as an operator reads it: its message, the field or line it names, and each failure (a
    refused push's test vectors) on lines of their own; the body as it is when it is not such JSON."""
    text = body.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    if not isinstance(doc, dict) or not isinstance(doc.get("error"), str):
        return text
    out = str(doc["error"])
    if doc.get("field"):
        out += f" (field {doc['field']})"
    if doc.get("line"):
        out += f" (line {doc['line']})"
    for failure in doc.get("failures") or ():
        out += "\n" + str(failure)
    return out


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def run_scripts_command(args: argparse.Namespace, out: TextIO) -> int:
    if args.op == "backtest":
        return run_backtest(args, out)
    if args.op == "push":
        name = args.name or Path(args.file).stem
        res = call_admin(args, "PUT", f"/v1/scripts/{name}", _read(args.file).encode(), "text/plain")
    elif args.op == "activate":
        body = json.dumps({"version": args.version, "percent": args.percent}).encode()
        res = call_admin(args, "POST", f"/v1/scripts/{args.name}/activate", body, "application/json")
    elif args.op == "list":
        res = call_admin(args, "GET", "/v1/scripts", None, "")
    elif args.op == "show":
        res = call_admin(args, "GET", f"/v1/scripts/{args.name}", None, "")
    else:
        events = []
        for n, line in enumerate(_read(args.events).splitlines(), 1):
            if line.strip():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CliError(f"{args.events}:{n}: not valid JSON: {e.msg}") from None
        req: dict[str, Any] = {"events": events}
        if args.source:
            req["source"] = _read(args.source)
        elif args.version is not None:
            req["version"] = args.version
        if args.context:
            req["context"] = json.loads(_read(args.context))
        res = call_admin(args, "POST", f"/v1/scripts/{args.name}/dry-run", json.dumps(req).encode(), "application/json")
    out.write(json.dumps(res, ensure_ascii=False, indent=2) + "\n")
    return 0
