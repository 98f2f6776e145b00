"""TimerFirer: a shard fires the due timers of its key groups as events of its next batches.

A timer is set by a rule's `later` and committed with the state that set it: its event in the group's
`timer_events` hash, its id in the group's `timers` sorted set scored by due time (see store/commit.py). The
firer reads each group's due timers (every `poll_s`, soonest first) and submits them to the shard's micro-batcher
as `Fired` events (event time = due time). The engine decides one only while the user's state still holds that
timer, and the unit that commits the decision removes it: a timer fires exactly once, across crashes and
restarts, and a timer replaced or cancelled after it was read does not fire. Each group has at most one chunk of
timers in flight, so a timer is never submitted twice at once; a chunk that fails to commit is read again. On a
Redis Cluster the due-timers script runs once per group (a script call stays in one slot), all in one pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from redis.exceptions import RedisClusterException, RedisError

from playbus.actors.engine.events import Fired
from playbus.actors.engine.keys import group_prefix
from playbus.actors.service.partition_reader import is_transient, rejection
from playbus.actors.store.commit import REJECTED_STREAM
from playbus.actors.store.connect import connect_async, is_cluster
from playbus.actors.store.scripts import lua
from playbus.actors.store.slots import aexecute, evalsha

__all__ = ["TimerFirer"]

log = logging.getLogger("playbus.timers")
Submit = Callable[[list[Any]], Awaitable[list[dict[str, Any]]]]
_decode = msgspec.msgpack.Decoder(Fired).decode


class TimerFirer:
    """Fires the due timers of `groups` through `submit(events)` (the micro-batcher's), on the caller's loop."""

    def __init__(self, redis_url: str, groups: list[int], submit: Submit, poll_s: float = 0.1, chunk: int = 500,
                 clock: Callable[[], float] = time.time,
                 on_fired: Callable[[list[float]], None] | None = None) -> None:
        """`on_fired`: given the lateness (ms, commit time minus due time) of the timers of each chunk fired."""
        self.client = connect_async(redis_url, socket_timeout=30)
        self.cluster = is_cluster(redis_url)
        self.groups = sorted(groups)
        self.submit = submit
        self.poll_s = poll_s
        self.chunk = chunk
        self.clock = clock
        self.on_fired = on_fired
        self._script = self.client.register_script(lua("timers_due"))
        self._keys = {kg: (group_prefix(kg) + "timers", group_prefix(kg) + "timer_events") for kg in self.groups}
        self.lateness_ms: deque[float] = deque(maxlen=100_000)  # commit time - due time of timers fired
        self.stats = {"fired": 0, "stale": 0, "failed_chunks": 0, "unreadable": 0}
        self.last_error = ""
        self.running = False

    async def run(self, stop: asyncio.Event) -> None:
        """Poll and fire until `stop`; then wait for the chunks in flight."""
        self.running = True
        inflight: dict[int, asyncio.Task[None]] = {}
        try:
            while not stop.is_set():
                idle = [kg for kg in self.groups if kg not in inflight]
                full = False
                if idle:
                    try:
                        due = await self._due(idle)
                    except (OSError, RedisError, RedisClusterException) as e:
                        self.last_error = f"{type(e).__name__}: {e}"
                        log.warning("timer firer: redis unavailable (%s); retrying", e)
                        await _sleep_unless(stop, 0.5)
                        continue
                    for kg, timers in zip(idle, due, strict=True):
                        if not timers:
                            continue
                        full = full or len(timers) >= 2 * self.chunk  # id, event pairs
                        task = asyncio.get_running_loop().create_task(self._fire(kg, timers))
                        inflight[kg] = task
                        task.add_done_callback(_forget(inflight, kg))
                if not full:  # more are due right now: poll again as soon as a group is free
                    await _sleep_unless(stop, self.poll_s)
                elif inflight:
                    await asyncio.wait(list(inflight.values()), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if inflight:
                await asyncio.gather(*inflight.values(), return_exceptions=True)
            self.running = False

    async def _due(self, groups: list[int]) -> list[list[bytes]]:
        now_ms = int(self.clock() * 1000)
        if self.cluster:
            cmds = [evalsha(self._script.sha, self._keys[kg], [now_ms, self.chunk]) for kg in groups]
            out: list[list[bytes]] = []
            for r in await aexecute(self.client, cmds, scripts=[lua("timers_due")]):
                if isinstance(r, Exception):
                    raise r
                out.append(r[0])  # the script answers a list per group given: one here
            return out
        keys = [k for kg in groups for k in self._keys[kg]]
        got: Any = await self._script(keys=keys, args=[now_ms, self.chunk])
        return list(got)

    async def _fire(self, kg: int, due: list[bytes]) -> None:
        """Submit one group's due timers (`due`: id, event, id, event, ...); never raises (what did not commit is
        read again at the next poll)."""
        events: list[Fired] = []
        unreadable: list[tuple[bytes, bytes, str]] = []
        for tid, blob in zip(due[::2], due[1::2], strict=True):
            try:
                events.append(_decode(blob))
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                unreadable.append((tid, blob, str(e)))
        if unreadable:
            await self._drop(kg, unreadable)
        if not events:
            return
        try:
            results = await self.submit(events)
        except Exception as e:  # noqa: BLE001 - not committed: the timers stay due and are read again
            self.stats["failed_chunks"] += 1
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            if is_transient(e):
                log.warning("timer firer: group %d: %d timers not committed (%s); firing them again", kg,
                            len(events), e)
            else:
                log.exception("timer firer: group %d: %d timers failed; firing them again in 1 s", kg, len(events))
                await asyncio.sleep(1.0)
            await asyncio.sleep(0.2)
            return
        done_ms = self.clock() * 1000
        late = [done_ms - (ev.ts or 0) for ev, r in zip(events, results, strict=False) if r["status"] == "applied"]
        self.stats["fired"] += len(late)
        self.stats["stale"] += len(events) - len(late)
        self.lateness_ms.extend(late)
        if late and self.on_fired is not None:
            self.on_fired(late)

    async def _drop(self, kg: int, unreadable: list[tuple[bytes, bytes, str]]) -> None:
        """Move timers whose event cannot be read (a hand-edited Redis; no commit writes such) to
        `playbus:rejected`: they could never fire, and would hold the group's other due timers back."""
        zset, events = self._keys[kg]
        records = [rejection(tid.decode("utf-8", "replace"), kg, blob, f"timer event cannot be read: {why}")
                   for tid, blob, why in unreadable]
        first = self.client.pipeline(transaction=False)
        if self.cluster:  # playbus:rejected is in another slot: first the records (at least once), then the removal
            for record in records:
                first.xadd(REJECTED_STREAM, {"rejected": record})
        pipe = self.client.pipeline(transaction=True)
        for record, (tid, _, _) in zip(records, unreadable, strict=True):
            if not self.cluster:
                pipe.xadd(REJECTED_STREAM, {"rejected": record})
            pipe.zrem(zset, tid)
            pipe.hdel(events, tid)
        try:
            if self.cluster:
                await first.execute()
            await pipe.execute()
        except (OSError, RedisError, RedisClusterException) as e:  # read again at the next poll
            self.last_error = f"{type(e).__name__}: {e}"
            return
        self.stats["unreadable"] += len(unreadable)
        self.last_error = f"group {kg}: {len(unreadable)} unreadable timer events moved to {REJECTED_STREAM}"
        log.error("timer firer: %s", self.last_error)

    async def close(self) -> None:
        await self.client.aclose()


def _forget(inflight: dict[int, asyncio.Task[None]], kg: int) -> Callable[[asyncio.Task[None]], None]:
    def done(_task: asyncio.Task[None]) -> None:
        inflight.pop(kg, None)

    return done


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
