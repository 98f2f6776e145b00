"""`playbus shards show|scale`: the shard map and rescaling a running cluster, over the admin HTTP API."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, TextIO

from playbus.admin import add_connection_args, call_admin
from playbus.errors import CliError

__all__ = ["add_shards_parser", "run_shards_command"]


def add_shards_parser(sub: Any) -> None:
    s = sub.add_parser("shards", help="show the shards and their key groups, or rescale a running cluster")
    add_connection_args(s, json_flag=True)
    ops = s.add_subparsers(dest="op", required=True)
    ops.add_parser("show", help="shards, key groups per shard, and the last rescale")
    sc = ops.add_parser("scale", help="move whole key groups until N shards own them, while traffic flows")
    sc.add_argument("count", type=int)
    sc.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the end (default: %(default)s)")
    sc.add_argument("--no-wait", action="store_true", help="return once the rescale is asked for")


def _shards(n: int) -> str:
    return f"{n} shard" + ("" if n == 1 else "s")


def _show(res: dict[str, Any], out: TextIO) -> None:
    out.write(_shards(res["count"]) + (f" (rescaling to {res['target']})" if res["rescaling"] else "") + "\n")
    for s in res["shards"]:
        out.write(f"  shard {s['shard']}: {s['groups']} key groups\n")
    last = res.get("last")
    if last:
        out.write(f"last rescale: {last['from']} -> {_shards(last['to'])}, {last['moved_groups']} key groups moved in "
                  f"{last['seconds']:.1f} s, their events paused {last['pause_ms']:.0f} ms\n")
        for p in last.get("problems") or []:
            out.write(f"  problem: {p}\n")


def run_shards_command(args: argparse.Namespace, out: TextIO) -> int:
    if args.op == "show":
        res = call_admin(args, "GET", "/v1/shards", None, "")
        if args.json:
            out.write(json.dumps(res, indent=2) + "\n")
        else:
            _show(res, out)
        return 0
    res = call_admin(args, "POST", "/v1/shards", json.dumps({"count": args.count}).encode(), "application/json")
    if args.no_wait:
        out.write(json.dumps(res, indent=2) + "\n" if args.json else f"{res['message']}\n")
        return 0
    if res["count"] == args.count and res["shards"] and len(res["shards"]) == args.count:
        out.write(f"already {_shards(args.count)}\n")
    else:
        out.write(f"rescaling from {res['count']} to {_shards(args.count)} ...\n")
    end = time.monotonic() + args.timeout
    while True:
        time.sleep(0.5)
        res = call_admin(args, "GET", "/v1/shards", None, "")
        if not res["rescaling"] and res["count"] == args.count:
            break
        if time.monotonic() > end:
            raise CliError(f"the rescale to {_shards(args.count)} has not ended after {args.timeout:g} s "
                           f"(now {res['count']}); see `playbus shards show` and run_cluster's output")
    if args.json:
        out.write(json.dumps(res, indent=2) + "\n")
    else:
        _show(res, out)
    return 0
