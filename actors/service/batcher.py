"""MicroBatcher: merges concurrent callers into micro-batches and pipelines decide and commit (plain asyncio).

Callers `submit` lists of events; the batcher cuts batches of up to `max_events`, waiting at most `max_wait_s`
for more, decides batch N+1 (`core.prepare`, on the event loop's thread) while batch N commits (`core.commit`,
on one commit thread, so commits stay ordered), and answers each caller only after its own batch committed.
If a commit fails, the batch decided on top of it fails too (its decisions saw state that never landed) and
both batches' users are forgotten (`core.forget`), so the callers' retries reload them from the store.

A batch whose decide step fails for a reason `recover` cannot mend is decided again caller by caller, so that
only the caller whose events fail gets the error.

A batch may decide only a first part of its events (`deferred` > 0: its rules used up the batch's time); the
rest goes back to the front of the queue, in order, and each caller is answered once all its events are.

The loop is supervised: if it dies (a bug), every waiting caller gets the error and the next `submit` starts
a new loop; no caller ever waits on a loop that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

from playbus.actors.service.errors import ServiceError

__all__ = ["BatchCore", "BatcherError", "MicroBatcher", "Prepared"]

log = logging.getLogger("playbus.batcher")


class BatcherError(ServiceError):
    """A batch could not be decided or committed; its events may be retried with the same ids."""


class Prepared(Protocol):
    """A decided batch: its results in input order (of all but the last `deferred` events, left undecided)
    and the users it changed."""

    results: list[dict[str, Any]]
    dirty: set[str]
    deferred: int


B = TypeVar("B", bound=Prepared)


class BatchCore(Protocol[B]):
    """What the batcher drives. `prepare` decides (touches engine state, no I/O in its decide loop), `commit`
    writes (touches no engine state, runs on the commit thread), `forget` drops users from memory so that they
    are reloaded from the store; `keys_of` names the users events touch. `recover` (a worker thread, I/O
    allowed) is given what a failed prepare raised and says whether preparing again may succeed (a budget
    lease was short: it leases more). `needs_prefetch`/`prefetch` do I/O between batches (lease top-ups)."""

    def prepare(self, events: list[Any]) -> B: ...

    def commit(self, batch: B, offsets: dict[int, str], rejected: dict[int, list[bytes]]) -> None: ...

    def forget(self, keys: set[str]) -> None: ...

    def keys_of(self, events: list[Any]) -> set[str]: ...

    def recover(self, error: Exception) -> bool: ...

    def needs_prefetch(self) -> bool: ...

    def prefetch(self) -> None: ...


class _Waiter:
    """A caller's events (or what is left of them), its future, the results of its earlier parts, and the
    waiter of its next part when a batch deferred the rest of its events."""

    __slots__ = ("alone", "events", "fut", "offset", "prefix", "rejected", "rest", "since")

    def __init__(self, events: list[Any], fut: asyncio.Future[list[dict[str, Any]]],
                 prefix: list[dict[str, Any]] | None = None, since: float | None = None,
                 offset: tuple[int, str] | None = None, rejected: list[bytes] | None = None) -> None:
        self.events = events
        self.fut = fut
        self.prefix = prefix or []
        self.offset = offset  # (key group, input entry id) this caller's events were read up to
        self.rejected = rejected or []  # invalid input entries read with them, for playbus:rejected
        self.rest: _Waiter | None = None
        self.since = time.monotonic() if since is None else since  # when the caller submitted
        self.alone = False  # decided in a batch of its own (its last batch failed with other callers in it)


class MicroBatcher(Generic[B]):
    """Micro-batches for one core; use from one event loop."""

    def __init__(self, core: BatchCore[B], max_events: int, max_wait_s: float,
                 on_committed: Callable[[B], None] | None = None, answer_timeout_s: float = 120.0,
                 prepare_attempts: int = 3) -> None:
        self.core = core
        self.answer_timeout_s = answer_timeout_s
        self.prepare_attempts = prepare_attempts
        self.max_events = max_events
        self.max_wait_s = max_wait_s
        self.on_committed = on_committed
        self._pending: list[_Waiter] = []
        self.queued = 0  # events waiting for a batch
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")  # one: ordered commits
        self._inflight: asyncio.Future[None] | None = None  # the commit of self._decided[0], if running
        self._decided: list[tuple[B, list[_Waiter]]] = []  # decided, not yet answered (oldest first)
        self._preparing: list[Any] | None = None  # the events of a batch being decided
        self._open: set[asyncio.Future[Any]] = set()  # callers not answered yet (for `barrier`)
        self.loop_deaths = 0  # times the loop died of an error (and was restarted by the next submit)

    @property
    def idle(self) -> bool:
        """Nothing queued and no commit in flight."""
        return not self._pending and not self._decided

    async def submit(self, events: list[Any], offset: tuple[int, str] | None = None,
                     rejected: list[bytes] | None = None) -> list[dict[str, Any]]:
        """Queue events for the next batch; their results once that batch has committed. `offset`: the
        (key group, input entry id) these events were read up to, and `rejected` the invalid entries read
        with them: both committed with the events."""
        self._ensure_loop()
        fut: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._open.add(fut)
        fut.add_done_callback(self._open.discard)
        self._pending.append(_Waiter(events, fut, offset=offset, rejected=rejected))
        self.queued += len(events)
        assert self._wake is not None
        self._wake.set()
        try:
            return await asyncio.wait_for(fut, self.answer_timeout_s)
        except asyncio.TimeoutError:
            raise BatcherError(f"no answer within {self.answer_timeout_s:g} s (the batch may still commit); "
                               "retry with the same ids") from None

    def oldest_wait_s(self) -> float:
        """How long the longest-waiting caller not yet answered has waited (0 when none): a stuck shard's sign."""
        waiters = [w for w in self._pending if not w.fut.done()]
        waiters += [w for _, take in self._decided for w in take if not w.fut.done()]
        return time.monotonic() - min(w.since for w in waiters) if waiters else 0.0

    async def barrier(self) -> None:
        """Wait until everything submitted before this call has been answered and its commit has settled (new
        submissions may go on meanwhile, unlike `drain`): after it, memory holds nothing decided from those
        events that Redis does not."""
        since = time.monotonic()
        opened = [f for f in self._open if not f.done()]
        if opened:
            await asyncio.wait(opened)
        # A caller that gave up waiting leaves its events queued: they are still decided and committed.
        while any(w.since <= since for w in self._pending) or any(
                w.since <= since for _, take in self._decided for w in take):
            await asyncio.sleep(0.005)
        # Commits run one at a time on one thread, in order: this returns once every commit before it has ended.
        await asyncio.get_running_loop().run_in_executor(self._committer, lambda: None)

    async def drain(self) -> None:
        """Wait until everything queued so far has been answered."""
        while not self.idle:
            await asyncio.sleep(0.01)

    # -- the loop ----------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._flusher())
            self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """Supervision: a loop that ends (it never should) fails every waiter, forgets every user of a batch
        it decided and did not answer (once the commit in flight has settled), and the next submit restarts
        it."""
        if task.cancelled():
            err: BaseException = BatcherError("the batching loop was cancelled; retry")
        else:
            exc = task.exception()
            err = BatcherError(f"the batching loop died ({type(exc).__name__}: {exc}); retry")
            log.error("batching loop died; failing its waiting callers", exc_info=exc)
            self.loop_deaths += 1
        self._task = None
        decided, self._decided = self._decided, []
        for _, take in decided:
            self._fail(take, err)
        pending, self._pending, self.queued = self._pending, [], 0
        self._fail(pending, err)
        keys: set[str] = set()
        for batch, _ in decided:
            keys |= batch.dirty
        if self._preparing is not None:
            keys |= self.core.keys_of(self._preparing)
            self._preparing = None
        inflight, self._inflight = self._inflight, None
        if not keys:
            return
        if inflight is None:
            self.core.forget(keys)
        else:
            inflight.add_done_callback(lambda _f: self.core.forget(keys))

    async def _flusher(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                # Idle: wait for callers, or for the commit in flight to settle, whichever comes first; new
                # callers are decided while that commit runs (then it settles before theirs starts).
                woken = asyncio.ensure_future(self._wake.wait())
                waits: set[asyncio.Future[Any]] = {woken}
                if self._inflight is not None:
                    waits.add(self._inflight)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if not woken.done():
                    woken.cancel()
                    await self._settle()
                    continue
                self._wake.clear()
                if self.queued < self.max_events and self.max_wait_s > 0:
                    await asyncio.sleep(self.max_wait_s)
                continue
            take: list[_Waiter] = []
            n = 0
            while self._pending and (n == 0 or not (take[0].alone or self._pending[0].alone)
                                     and n + len(self._pending[0].events) <= self.max_events):
                item = self._pending.pop(0)
                take.append(item)
                n += len(item.events)
            self.queued -= n
            events = [e for w in take for e in w.events]
            self._preparing = events
            batch = await self._prepare(events, take)
            self._preparing = None
            if batch is None:
                continue
            if batch.deferred:
                self._defer(take, len(events) - batch.deferred)
            self._decided.append((batch, take))
            if self._inflight is not None and not await self._settle():
                self._decided.pop()  # this batch, decided on top of a commit that failed
                self.core.forget(batch.dirty)
                self._fail(take, BatcherError("the previous batch failed to commit; retry"))
                continue
            offsets: dict[int, str] = {}
            rejected: dict[int, list[bytes]] = {}
            for w in take:
                if w.offset is not None:
                    offsets[w.offset[0]] = w.offset[1]
                    if w.rejected:
                        rejected.setdefault(w.offset[0], []).extend(w.rejected)
            self._inflight = loop.run_in_executor(self._committer, self.core.commit, batch, offsets, rejected)
            await asyncio.sleep(0)  # let new callers in while the commit runs

    async def _prepare(self, events: list[Any], take: list[_Waiter]) -> B | None:
        """Decide a batch; None (its callers failed) when it cannot be. A failed prepare leaves no trace: once
        the commit in flight has settled (the store then holds everything decided before this batch), every
        user the batch touched is forgotten, so nothing half-decided reaches a later commit."""
        if self.core.needs_prefetch():
            try:
                await asyncio.to_thread(self.core.prefetch)
            except Exception as e:  # noqa: BLE001 - decide anyway; a short lease asks again through recover
                log.warning("prefetch before a batch failed: %s", e)
        for attempt in range(self.prepare_attempts):
            try:
                return self.core.prepare(events)
            except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error
                error: Exception = e
            if self._inflight is not None:
                await self._settle()
            self.core.forget(self.core.keys_of(events))
            retry = False
            if attempt + 1 < self.prepare_attempts:
                try:
                    retry = await asyncio.to_thread(self.core.recover, error)
                except Exception as e:  # noqa: BLE001 - recovering failed too: fail the batch with that
                    error = e
            if not retry:
                if len(take) > 1:
                    # One caller's events may be what fails (a bug the input triggers): decide each caller
                    # alone, in order, so that the others are answered and only the failing one gets the error.
                    log.warning("batch of %d callers failed (%s): deciding each alone", len(take), error)
                    for w in take:
                        w.alone = True
                    self._pending[:0] = take
                    self.queued += len(events)
                    return None
                self._fail(take, error)
                return None
        self._fail(take, BatcherError(f"the batch could not be decided in {self.prepare_attempts} attempts"))
        return None

    async def _settle(self) -> bool:
        """Wait for the commit in flight (of the oldest decided batch) and answer its callers; False if it
        failed."""
        assert self._inflight is not None
        batch, take = self._decided[0]
        try:
            await self._inflight
        except Exception as e:  # noqa: BLE001 - the callers retry; dedup makes that safe
            self._inflight = None
            del self._decided[0]
            self.core.forget(batch.dirty)
            self._fail(take, e)
            return False
        self._inflight = None
        del self._decided[0]
        if self.on_committed is not None:
            try:
                self.on_committed(batch)
            except Exception:  # noqa: BLE001 - metrics must never fail a committed batch
                log.exception("on_committed failed")
        i = 0
        for w in take:
            part = batch.results[i:i + len(w.events)]
            i += len(w.events)
            if w.rest is not None:
                w.rest.prefix = w.prefix + part  # the caller's next part is answered with these
            elif not w.fut.done():
                w.fut.set_result(w.prefix + part if w.prefix else part)
        return True

    def _defer(self, take: list[_Waiter], decided: int) -> None:
        """Cut `take` after its first `decided` events; the rest goes back to the front of the queue."""
        i = 0
        back: list[_Waiter] = []
        for k, w in enumerate(take):
            if i + len(w.events) <= decided:
                i += len(w.events)
                continue
            cut = decided - i
            if cut > 0:
                w.rest = _Waiter(w.events[cut:], w.fut, since=w.since, offset=w.offset, rejected=w.rejected)
                w.offset, w.rejected = None, []  # what was read is committed with the caller's last part
                w.events = w.events[:cut]
                back = [w.rest, *take[k + 1:]]
                del take[k + 1:]
            else:
                back = take[k:]
                del take[k:]
            break
        self._pending[:0] = back
        self.queued += sum(len(w.events) for w in back)
        assert self._wake is not None
        self._wake.set()

    def _fail(self, take: list[_Waiter], e: BaseException) -> None:
        if take:
            log.warning("batch of %d events failed: %s", sum(len(w.events) for w in take), e)
        for w in take:
            if not w.fut.done():
                w.fut.set_exception(e)
            # The caller's later part must not be applied before a retry of this one: drop it from the queue.
            rest = w.rest
            while rest is not None:
                if rest in self._pending:
                    self._pending.remove(rest)
                    self.queued -= len(rest.events)
                rest = rest.rest

    def close(self) -> None:
        """Stop the commit thread (after `drain`)."""
        self._committer.shutdown(wait=True)
