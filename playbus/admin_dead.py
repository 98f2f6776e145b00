"""`playbus dead ...`: list dead-lettered deliveries and redrive them, over the admin HTTP API.

    playbus dead list [--target T] [--limit N] [--json]
    playbus dead redrive (--ids ID [ID ...] | --all) [--target T] [--json]

IDs are action ids (the first column of `list`, the `Idempotency-Key` receivers saw).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, TextIO
from urllib.parse import urlencode

from playbus.admin import call_admin
from playbus.errors import CliError

__all__ = ["add_dead_parser", "run_dead_command"]


def _connection_args(p: argparse.ArgumentParser, suppress: bool) -> None:
    """--url and --token, accepted before the operation and after it (`suppress`: no default, so that a value
    given before the operation is kept)."""
    url_default = argparse.SUPPRESS if suppress else os.environ.get("PLAYBUS_URL", "http://127.0.0.1:8000")
    token_default = argparse.SUPPRESS if suppress else os.environ.get("PLAYBUS_ADMIN_TOKEN")
    p.add_argument("--url", default=url_default, help="playbus HTTP address (default: $PLAYBUS_URL or "
                                                      "http://127.0.0.1:8000)")
    p.add_argument("--token", default=token_default, help="admin token (default: $PLAYBUS_ADMIN_TOKEN)")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= n <= 1000:
        raise argparse.ArgumentTypeError(f"expected 1 to 1000, got {n}")
    return n


def add_dead_parser(sub: Any) -> None:
    d = sub.add_parser("dead", help="list dead-lettered deliveries and send them again with their original ids")
    _connection_args(d, suppress=False)
    ops = d.add_subparsers(dest="op", required=True)
    ls = ops.add_parser("list", help="the newest dead letters, newest first")
    ls.add_argument("--target", help="only this gameplay's (the action type before its first dot)")
    ls.add_argument("--limit", type=_positive, default=50, help="at most this many (1 to 1000, default %(default)s)")
    ls.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")
    _connection_args(ls, suppress=True)
    r = ops.add_parser("redrive", help="queue dead actions again for delivery, with their original ids")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", nargs="+", metavar="ID", help="action ids (as `playbus dead list` shows them)")
    which.add_argument("--all", action="store_true", help="every dead letter (of --target when given)")
    r.add_argument("--target", help="only this gameplay's dead letters")
    r.add_argument("--json", action="store_true", help="print the API's JSON answer")
    _connection_args(r, suppress=True)


def _age(at_ms: Any, now_ms: int) -> str:
    if not isinstance(at_ms, int):
        return "?"
    s = max(0, now_ms - at_ms) // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _table(dead: list[dict[str, Any]], out: TextIO) -> None:
    if not dead:
        out.write("no dead letters\n")
        return
    now = int(time.time() * 1000)
    rows = [("ID", "TARGET", "ATTEMPTS", "AGE", "ERROR")]
    for d in dead:
        action = d.get("action")
        aid = action.get("id", "") if isinstance(action, dict) else f"(dead entry {d.get('id')}, not an action)"
        error = " ".join(str(d.get("error", "")).split())
        rows.append((str(aid), str(d.get("target") or "-"), str(d.get("attempts", "")), _age(d.get("at"), now),
                     error[:100] + ("..." if len(error) > 100 else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4] + "\n")


def run_dead_command(args: argparse.Namespace, out: TextIO) -> int:
    if args.op == "list":
        q: dict[str, Any] = {"limit": args.limit}
        if args.target:
            q["target"] = args.target
        res = call_admin(args, "GET", "/v1/dead?" + urlencode(q), None, "")
        if args.json:
            out.write(json.dumps(res, ensure_ascii=False, indent=2) + "\n")
        else:
            _table(res.get("dead", []) if isinstance(res, dict) else [], out)
        return 0
    if args.op != "redrive":
        raise CliError(f"unknown dead operation {args.op!r}")
    body: dict[str, Any] = {"all": True} if args.all else {"ids": args.ids}
    if args.target:
        body["target"] = args.target
    res = call_admin(args, "POST", "/v1/dead/redrive", json.dumps(body).encode(), "application/json")
    if args.json:
        out.write(json.dumps(res, ensure_ascii=False, indent=2) + "\n")
        return 0
    n = res.get("redriven", 0) if isinstance(res, dict) else 0
    ids = res.get("ids", []) if isinstance(res, dict) else []
    missing = res.get("not_found", []) if isinstance(res, dict) else []
    out.write(f"redriven: {n} action{'' if n == 1 else 's'} queued again with their original ids\n")
    for aid in ids:
        out.write(f"  {aid}\n")
    if isinstance(res, dict) and res.get("ids_truncated"):
        out.write(f"  ... ({n - len(ids)} more)\n")
    if missing:
        out.write(f"not found (no dead letter{' of ' + args.target if args.target else ''}): {' '.join(missing)}\n")
    return 0
