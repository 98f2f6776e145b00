"""`playbus failed list|replay`: failed rule runs and their replay (补单), over the admin HTTP API."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, TextIO
from urllib.parse import urlencode

from playbus.admin import add_connection_args, call_admin

__all__ = ["add_failed_parser", "run_failed_command"]


def add_failed_parser(sub: Any) -> None:
    f = sub.add_parser("failed", help="list failed rule runs and replay them on the active version (补单)")
    add_connection_args(f, json_flag=True)
    ops = f.add_subparsers(dest="op", required=True)
    ls = ops.add_parser("list", help="failed runs, newest first")
    ls.add_argument("--campaign")
    ls.add_argument("--rule")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON answer")
    rp = ops.add_parser("replay", help="run each failed run of a campaign (and rule) once more, on the active version")
    rp.add_argument("campaign")
    rp.add_argument("--rule")
    rp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON answer")


def run_failed_command(args: argparse.Namespace, out: TextIO) -> int:
    if args.op == "list":
        query = urlencode({k: v for k, v in (("campaign", args.campaign), ("rule", args.rule),
                                              ("limit", args.limit)) if v is not None})
        res = call_admin(args, "GET", f"/v1/failed?{query}", None, "")
        if args.json:
            out.write(json.dumps(res, ensure_ascii=False, indent=2) + "\n")
            return 0
        for r in res["failed"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"] / 1000))
            e = r["event"]
            out.write(f"{when}  {r['id']:<24} {e['campaign']}/{e['user']} {e['type']} rule {r['rule']} "
                      f"v{r['script_version']}: {r['error']}\n")
        out.write(f"{len(res['failed'])} failed runs\n")
        return 0
    body: dict[str, Any] = {"campaign": args.campaign}
    if args.rule:
        body["rule"] = args.rule
    out.write(f"replaying the failed runs of {args.campaign}{'/' + args.rule if args.rule else ''} ...\n")
    res = call_admin(args, "POST", "/v1/failed/replay", json.dumps(body).encode(), "application/json")
    if args.json:
        out.write(json.dumps(res, ensure_ascii=False, indent=2) + "\n")
        return 0
    out.write(f"found {res['found']}: replayed {res['replayed']}, failed again {res['failed_again']}, "
              f"replayed before on this version {res['already_replayed']}, refused {len(res['refused'])}; "
              f"{len(res['actions'])} actions granted{' (more remain: run it again)' if res['more'] else ''}\n")
    for a in res["actions"]:
        out.write(f"  {a['id']} {a['type']} {a['campaign']}/{a['user']} {json.dumps(a['params'])}\n")
    for e in res["errors"]:
        out.write(f"  still failing: {e['id']}: {'; '.join(e['errors'])}\n")
    return 0
