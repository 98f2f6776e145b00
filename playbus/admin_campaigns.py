"""`playbus campaigns ...` and `playbus audit`: operating running campaigns over the admin HTTP API."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, TextIO

from playbus.admin import add_connection_args, call_admin
from playbus.config.errors import ConfigError
from playbus.config.loader import read_yaml
from playbus.errors import CliError

__all__ = ["add_audit_parser", "add_campaigns_parser", "run_audit_command", "run_campaigns_command"]


def add_campaigns_parser(sub: Any) -> None:
    c = sub.add_parser("campaigns", help="show, pause, resume, top up and watch running campaigns")
    add_connection_args(c, json_flag=True)
    ops = c.add_subparsers(dest="op", required=True)
    for op, text in (("show", "the campaign as it runs, and whether it is paused"),
                     ("pause", "apply its events with no rule run (a kill switch), from the shards' next batch"),
                     ("resume", "run its rules again"),
                     ("stats", "budgets, grants, refusals, rule runs and errors, delivery")):
        p = ops.add_parser(op, help=text)
        p.add_argument("campaign")
        _json_here(p)
    t = ops.add_parser("topup", help="raise a budget's total")
    t.add_argument("campaign")
    t.add_argument("budget")
    t.add_argument("amount", type=int)
    _json_here(t)
    u = ops.add_parser("push", help="create or replace a campaign from a JSON or YAML file (one `campaigns` item, "
                                    "scripts by name)")
    u.add_argument("file")
    _json_here(u)


def _json_here(p: Any) -> None:
    """--json after the operation too (it keeps the value given before it)."""
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON answer")


def add_audit_parser(sub: Any) -> None:
    a = sub.add_parser("audit", help="who changed what, when (newest first)")
    add_connection_args(a, json_flag=True)
    a.add_argument("--limit", type=int, default=20)


def run_campaigns_command(args: argparse.Namespace, out: TextIO) -> int:
    if args.op == "push":
        doc = _read_campaign(args.file)
        cid = doc.get("id") if isinstance(doc, dict) else None
        if not isinstance(cid, str):
            raise CliError(f"{args.file}: the campaign needs an 'id'")
        res = call_admin(args, "PUT", f"/v1/campaigns/{cid}", json.dumps(doc).encode(), "application/json")
        out.write(json.dumps(res, ensure_ascii=False, indent=2) + "\n")
        return 0
    base = f"/v1/campaigns/{args.campaign}"
    if args.op == "show":
        res = call_admin(args, "GET", base, None, "")
    elif args.op in ("pause", "resume"):
        res = call_admin(args, "POST", f"{base}/{args.op}", b"{}", "application/json")
    elif args.op == "topup":
        body = json.dumps({"amount": args.amount}).encode()
        res = call_admin(args, "POST", f"{base}/budgets/{args.budget}/topup", body, "application/json")
    else:
        res = call_admin(args, "GET", f"{base}/stats", None, "")
    if args.json or args.op == "show":
        out.write(json.dumps(res, ensure_ascii=False, indent=2) + "\n")
    elif args.op in ("pause", "resume"):
        out.write(f"campaign {res['id']}: {'paused' if res['paused'] else 'running'}"
                  f"{'' if res['changed'] else ' (it already was)'}\n")
    elif args.op == "topup":
        out.write(f"campaign {res['campaign']}: budget {res['budget']} total is now {res['total']:,}\n")
    else:
        out.write(render_stats(res))
    return 0


def _read_campaign(path: str) -> Any:
    """A campaign document from a JSON or YAML file (YAML dates kept as the text written)."""
    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 - read at once
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        return read_yaml(text, path, text_dates=True)[1]  # YAML is a superset of JSON
    except ConfigError as e:
        raise CliError(str(e)) from None


def render_stats(s: dict[str, Any]) -> str:
    """The stats as an operator reads them."""
    lines = [f"campaign {s['campaign']}{' (PAUSED)' if s['paused'] else ''}"]
    for name, b in s["budgets"].items():
        lines.append(f"  budget {name}: spent {b['spent']:,} of {b['total']:,}, {b['left']:,} left")
    for kind in ("grants", "refusals"):
        for key, n in sorted(s[kind].items()):
            lines.append(f"  {kind[:-1]:<7} {key}: {n:,}")
    for rule, versions in sorted(s["rules"].items()):
        for version, c in sorted(versions.items(), key=lambda kv: int(kv[0])):
            lines.append(f"  rule {rule} v{version}: {c['runs']:,} runs, {c['errors']:,} errors")
    d = s["delivery"]
    lines.append(f"  delivery: {d['backlog']:,} waiting, {d['dead']:,} dead{'' if d['exact'] else ' (at least)'}")
    return "\n".join(lines) + "\n"


def run_audit_command(args: argparse.Namespace, out: TextIO) -> int:
    res = call_admin(args, "GET", f"/v1/audit?limit={args.limit}", None, "")
    if args.json:
        out.write(json.dumps(res, ensure_ascii=False, indent=2) + "\n")
        return 0
    for e in res["entries"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"] / 1000))
        detail = json.dumps(e["detail"], ensure_ascii=False) if e["detail"] else ""
        out.write(f"{when}  {e['who']:<12} {e['action']:<16} {e['target']}  {detail}\n")
    return 0
