"""Pipelines on a Redis Cluster: commands of many slots in one round trip per node, each command's keys in one slot.

redis-py's cluster pipeline splits a pipeline by node and follows MOVED and ASK, but: it refuses `evalsha` (and
so `Script` objects) in a pipeline, it asks the server for the keys of every XREAD/XREADGROUP (COMMAND GETKEYS: a
round trip per command), it gives up on TRYAGAIN after 0.4 s, and it cannot reload a script a node does not
know (NOSCRIPT: a node that was added, restarted or promoted). `execute`/`aexecute` run a list of `Cmd`s with all
of that handled:

- a Cmd may name the key that routes it (`route`), which spares the key lookup;
- commands answered TRYAGAIN (or redis-py's "TTL exhausted" after its own redirects) are sent again, with backoff,
  for up to TRYAGAIN_S; they did not run, so this is safe for any command;
- NOSCRIPT: the given scripts are loaded on every primary, and what failed is sent again.
Errors other than those are returned in place of the command's answer, as `raise_on_error=False` does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from redis.exceptions import NoScriptError

from playbus.actors.store.connect import RETRY_ERRORS, TRYAGAIN_S

__all__ = ["Cmd", "aexecute", "aload_scripts", "evalsha", "execute", "load_scripts"]


class Cmd(NamedTuple):
    """One command: its arguments, and the key whose slot it goes to when redis-py cannot see it cheaply."""

    args: tuple[Any, ...]
    route: str | bytes | None = None


def evalsha(sha: str, keys: Sequence[Any], args: Sequence[Any] = ()) -> Cmd:
    """An EVALSHA command (its keys in one slot; redis-py reads the slot from the keys)."""
    return Cmd(("EVALSHA", sha, len(keys), *keys, *args))


def load_scripts(client: Any, sources: Iterable[str]) -> None:
    """SCRIPT LOAD each source on every primary of the cluster."""
    for src in sources:
        client.script_load(src)


async def aload_scripts(client: Any, sources: Iterable[str]) -> None:
    for src in sources:
        await client.script_load(src)


def _queue(pipe: Any, client: Any, cmd: Cmd) -> None:
    if cmd.route is None:
        pipe.execute_command(*cmd.args)
    else:
        pipe.execute_command(*cmd.args, target_nodes=client.get_node_from_key(cmd.route))


def _record(todo: list[int], out: list[Any], results: list[Any], reload: bool) -> tuple[list[int], bool]:
    """Put a pipeline's answers in `results`; the commands to send again (TRYAGAIN and the like, or NOSCRIPT when
    the scripts can be loaded) and whether a script must be loaded first."""
    again, noscript = [], False
    for i, r in zip(todo, out, strict=True):
        results[i] = r
        if isinstance(r, NoScriptError) and reload:
            noscript = True
            again.append(i)
        elif isinstance(r, RETRY_ERRORS):
            again.append(i)
    return again, noscript


def execute(client: Any, cmds: Sequence[Cmd], scripts: Iterable[str] = (), deadline_s: float = TRYAGAIN_S) -> list[Any]:
    """Run `cmds` on a (sync) cluster client in one pipeline, their answers in order (see the module doc)."""
    results: list[Any] = [None] * len(cmds)
    todo = list(range(len(cmds)))
    deadline = time.monotonic() + deadline_s
    delay = 0.01
    sources = list(scripts)
    while todo:
        pipe = client.pipeline(transaction=False)
        for i in todo:
            _queue(pipe, client, cmds[i])
        again, noscript = _record(todo, pipe.execute(raise_on_error=False), results, bool(sources))
        if not again or time.monotonic() >= deadline:
            break
        if noscript:
            load_scripts(client, sources)
        else:
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        todo = again
    return results


async def aexecute(client: Any, cmds: Sequence[Cmd], scripts: Iterable[str] = (),
                   deadline_s: float = TRYAGAIN_S) -> list[Any]:
    """`execute` for an asyncio cluster client."""
    if cmds and any(c.route is not None for c in cmds):
        await client.initialize()  # idempotent; routing by key needs the slot table
    results: list[Any] = [None] * len(cmds)
    todo = list(range(len(cmds)))
    deadline = time.monotonic() + deadline_s
    delay = 0.01
    sources = list(scripts)
    while todo:
        pipe = client.pipeline(transaction=False)
        for i in todo:
            _queue(pipe, client, cmds[i])
        again, noscript = _record(todo, await pipe.execute(raise_on_error=False), results, bool(sources))
        if not again or time.monotonic() >= deadline:
            break
        if noscript:
            await aload_scripts(client, sources)
        else:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        todo = again
    return results
