"""DeadLetters: list the actions the deliverers gave up on, and redrive them with their original ids.

    playbus:dead             stream  fields action, error, attempts, kg, entry (written by Outbox.settle)
    playbus:{kg17}:outbox    stream  field "action": where a redriven action goes back to, as its original bytes

Redriving one action is one atomic step in Redis (a Lua script, a batch of actions of one key group per call):
check that its dead letters are still there, XADD its action JSON, unchanged, to the outbox of its key group,
XDEL its dead letters. So a crash never loses a dead letter (it is either still dead or queued again), and two
redrives, even running at the same time, never queue it twice: the second finds nothing. The deliverers read
the new outbox entry as any other: a fresh attempt count and retry window, the same action id (hence the same
`Idempotency-Key`) and the same body bytes.

Actions are chosen by their action id (the `id` of the action JSON, what operators and receivers see), not by
the dead stream's entry ids. An action dead-lettered twice (a deliverer crashing between writing its dead letter
and acking its outbox entry, then the action failing again) is queued once and both its dead letters are removed.
Dead letters whose action is not a JSON object with a string `id` and `type` cannot be redriven (they would only
be dead-lettered again): they are listed, with `action` null and the stored text under `raw`, and skipped.

On a Redis Cluster the dead stream and an outbox are in different slots, so no one script can do both. There a
redrive is three steps: a script in the dead stream's slot moves the chosen dead letters' action bytes into the
hash `{playbus:dead}:redriving` (its hash tag is the dead stream's name, hence its slot) and XDELs them, atomically,
so two redrives at once still never take one action twice; then the actions are XADDed to their outboxes; then
their `redriving` fields are removed. A crash between the steps leaves the action in `redriving`, never lost: a
later redrive finishes what has waited there over LEFTOVER_S, adding it to its outbox (a second time if the crash
came after that XADD: at least once, with the same id, as every delivery).
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterator
from typing import Any

from playbus.actors.engine.keys import group_prefix
from playbus.actors.store.connect import is_cluster_client
from playbus.actors.store.outbox import DEAD_STREAM

__all__ = ["LEFTOVER_S", "MAX_LIST", "DeadLetters"]

MAX_LIST = 1000  # dead letters listed at most per call
_PAGE = 1000  # entries read per XRANGE / XREVRANGE call
_BATCH = 500  # actions redriven per script call
LEFTOVER_S = 60.0  # a Redis Cluster redrive finishes what an earlier one left in `redriving` this long ago

# A Lua function both scripts share: the action bytes and the still-present dead-letter ids of one action, whose
# n entry ids start at ARGV[i + 1].
_COLLECT = """
local function collect(i, n)
  local raw, found = nil, {}
  for j = i + 1, i + n do
    local e = redis.call('XRANGE', KEYS[1], ARGV[j], ARGV[j])
    if #e == 1 then
      local f = e[1][2]
      for k = 1, #f, 2 do
        if f[k] == 'action' then
          found[#found + 1] = ARGV[j]
          if raw == nil then raw = f[k + 1] end
        end
      end
    end
  end
  return raw, found
end
"""

# KEYS[1] the dead stream, KEYS[2] the outbox of one key group. ARGV: the actions to redrive, each as <n> followed
# by the n dead-stream entry ids of its dead letters. For each action whose dead letters (any of them) are still
# there: one XADD of the stored action bytes to the outbox, and XDEL of those dead letters. Returns the 1-based
# positions of the actions redriven.
_REDRIVE = _COLLECT + """
local out, i, pos = {}, 1, 0
while i <= #ARGV do
  pos = pos + 1
  local n = tonumber(ARGV[i])
  local raw, found = collect(i, n)
  if raw ~= nil then
    redis.call('XADD', KEYS[2], '*', 'action', raw)
    redis.call('XDEL', KEYS[1], unpack(found))
    out[#out + 1] = pos
  end
  i = i + n + 1
end
return out
"""

# Redis Cluster, step 1. KEYS[1] the dead stream, KEYS[2] its `redriving` hash (same slot). ARGV[1] the key group,
# ARGV[2] now (ms), then the actions as for _REDRIVE. For each action whose dead letters are still there: HSET
# "<group>/<first dead entry id>/<now>" -> the action bytes, and XDEL its dead letters. Returns, per action taken,
# its 1-based position, then that field, then the bytes.
_TAKE = _COLLECT + """
local out, i, pos = {}, 3, 0
while i <= #ARGV do
  pos = pos + 1
  local n = tonumber(ARGV[i])
  local raw, found = collect(i, n)
  if raw ~= nil then
    local field = ARGV[1] .. '/' .. found[1] .. '/' .. ARGV[2]
    redis.call('HSET', KEYS[2], field, raw)
    redis.call('XDEL', KEYS[1], unpack(found))
    out[#out + 1] = pos
    out[#out + 1] = field
    out[#out + 1] = raw
  end
  i = i + n + 1
end
return out
"""


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _field(fields: dict[Any, Any], name: str) -> Any:
    v = fields.get(name.encode())
    return fields.get(name) if v is None else v


def _int(v: Any) -> int | None:
    try:
        return int(_text(v))
    except (TypeError, ValueError):
        return None


def _action(raw: Any) -> dict[str, Any] | None:
    """The action of a dead letter, when it is a JSON object with a string id and type; else None."""
    try:
        a = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if isinstance(a, dict) and isinstance(a.get("id"), str) and isinstance(a.get("type"), str):
        return a
    return None


class DeadLetters:
    """The dead-letter stream: newest-first listings and redrives. `client`: a redis-py client (bytes or str)."""

    def __init__(self, client: Any, dead_stream: str = DEAD_STREAM) -> None:
        self.client = client
        self.dead_stream = dead_stream
        self.redriving = "{" + dead_stream + "}:redriving"  # in the dead stream's slot (its whole name is the tag)
        self.cluster = is_cluster_client(client)
        self._redrive = client.register_script(_REDRIVE)
        self._take = client.register_script(_TAKE)

    # -- reading ----------------------------------------------------------------------------------
    def _entries(self, newest_first: bool) -> Iterator[dict[str, Any]]:
        """Every dead letter, page by page, decoded as `list` answers it (plus "raw": the stored action bytes)."""
        last: str | None = None
        while True:
            if newest_first:
                page = self.client.xrevrange(self.dead_stream, "+" if last is None else f"({last}", "-", count=_PAGE)
            else:
                page = self.client.xrange(self.dead_stream, "-" if last is None else f"({last}", "+", count=_PAGE)
            for entry_id, fields in page:
                yield self._decode(_text(entry_id), fields or {})
            if len(page) < _PAGE:
                return
            last = _text(page[-1][0])

    @staticmethod
    def _decode(entry_id: str, fields: dict[Any, Any]) -> dict[str, Any]:
        raw = _field(fields, "action")
        action = _action(raw) if raw is not None else None
        target = action["type"].split(".", 1)[0] if action is not None else ""
        attempts, kg = _int(_field(fields, "attempts")), _int(_field(fields, "kg"))
        out: dict[str, Any] = {"id": entry_id, "action": action, "target": target,
                               "error": _text(_field(fields, "error") or b""), "attempts": attempts or 0,
                               "kg": kg, "at": int(entry_id.split("-", 1)[0])}
        if action is None:
            out["raw"] = _text(raw or b"")[:1000]
        return out

    def list(self, target: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest `limit` (at most MAX_LIST) dead letters, of gameplay `target` when given, newest first:
        {"id" (dead-stream entry id), "action" (the action, with its original "id"), "target" (the gameplay:
        the action type before its first dot), "error", "attempts", "kg", "at" (ms since epoch)}."""
        limit = max(0, min(limit, MAX_LIST))
        out: list[dict[str, Any]] = []
        if limit == 0:
            return out
        for d in self._entries(newest_first=True):
            if target is None or d["target"] == target:
                out.append(d)
                if len(out) >= limit:
                    break
        return out

    def count(self) -> int:
        """How many dead letters there are (XLEN)."""
        return int(self.client.xlen(self.dead_stream))

    # -- redriving --------------------------------------------------------------------------------
    def redrive(self, target: str | None = None, ids: builtins.list[str] | None = None,
                all: bool = False) -> dict[str, Any]:
        """Queue dead actions again in the outbox of their key group, with their original ids and bytes, and
        remove them from the dead stream (atomically per action; see the module doc).

        Which ones: `ids` (action ids), or with `all` every dead letter; either narrowed to gameplay `target`
        when given. Answers {"redriven": n, "ids": [action ids redriven, oldest dead letter first],
        "not_found": [the given ids with no dead letter (of `target`) left]}. Redriving the same ids again
        finds nothing: they are then all in "not_found"."""
        if ids is None and not all:
            raise ValueError("redrive needs ids or all=True")
        wanted = None if all and ids is None else list(dict.fromkeys(ids or []))
        want = set(wanted) if wanted is not None else None
        # action id -> (kg, dead entry ids), oldest first: one outbox entry per action, whatever its dead letters
        chosen: dict[str, tuple[int, list[str]]] = {}
        for d in self._entries(newest_first=False):
            a = d["action"]
            if a is None or d["kg"] is None or d["kg"] < 0:
                continue  # not redrivable: it would only be dead-lettered again
            if target is not None and d["target"] != target:
                continue
            if want is not None and a["id"] not in want:
                continue
            kg, entries = chosen.setdefault(a["id"], (d["kg"], []))
            entries.append(d["id"])
        by_kg: dict[int, list[tuple[str, list[str]]]] = {}
        for aid, (kg, entries) in chosen.items():
            by_kg.setdefault(kg, []).append((aid, entries))
        done: set[str] = set()
        if self.cluster:
            self._finish_leftovers()
        for kg, items in sorted(by_kg.items()):
            outbox = group_prefix(kg) + "outbox"
            for i in range(0, len(items), _BATCH):
                batch = items[i:i + _BATCH]
                args: list[str] = []
                for _, entries in batch:
                    args.append(str(len(entries)))
                    args.extend(entries)
                if self.cluster:
                    positions = self._redrive_cluster(kg, args)
                else:
                    positions = self._redrive(keys=[self.dead_stream, outbox], args=args)
                for pos in positions:
                    done.add(batch[int(pos) - 1][0])
        redriven = [aid for aid in chosen if aid in done]  # oldest dead letter first
        not_found: builtins.list[str] = [aid for aid in wanted if aid not in done] if wanted is not None else []
        return {"redriven": len(redriven), "ids": redriven, "not_found": not_found}

    # -- Redis Cluster ----------------------------------------------------------------------------
    def _redrive_cluster(self, kg: int, args: builtins.list[str]) -> builtins.list[int]:
        """The three steps of a redrive on a Redis Cluster (see the module doc); the positions redriven."""
        got = self._take(keys=[self.dead_stream, self.redriving], args=[kg, int(time.time() * 1000), *args])
        taken = [(int(got[i]), got[i + 1], got[i + 2]) for i in range(0, len(got), 3)]
        if taken:
            self._requeue({field: raw for _, field, raw in taken})
        return [pos for pos, _, _ in taken]

    def _requeue(self, fields: dict[Any, Any]) -> None:
        """XADD each action (field "<group>/<entry>/<ms>" -> its bytes) to its group's outbox, then HDEL the fields."""
        pipe = self.client.pipeline(transaction=False)
        for field, raw in fields.items():
            pipe.xadd(group_prefix(int(_text(field).split("/", 1)[0])) + "outbox", {"action": raw})
        pipe.execute()
        self.client.hdel(self.redriving, *fields)

    def _finish_leftovers(self) -> None:
        """Queue what a redrive stopped half-way (over LEFTOVER_S ago) left in `redriving`."""
        raw: Any = self.client.hgetall(self.redriving)
        cutoff = (time.time() - LEFTOVER_S) * 1000
        old = {f: v for f, v in raw.items() if int(_text(f).rsplit("/", 1)[1]) < cutoff}
        if old:
            self._requeue(old)
