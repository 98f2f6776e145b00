"""MicroBatcher's state machine with a plain fake core (no Ray, no Redis): batching, pipelining, and its failure
branches (a failed prepare, a failed commit with a batch decided on top of it, the loop task dying)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from playbus.actors.service.batcher import BatcherError, MicroBatcher


class ShortLease(Exception):
    def __init__(self, event_id: str) -> None:
        super().__init__(f"lease short for {event_id}")
        self.event_id = event_id


@dataclass
class Batch:
    results: list[dict[str, Any]]
    dirty: set[str]
    events: list[Any] = field(default_factory=list)
    deferred: int = 0


class FakeCore:
    """Decides by echoing; commits into `committed`; records what it was asked to forget.

    `fail_prepare`/`fail_commit` hold event ids whose batch raises; `gate` (a threading.Event) holds commits
    until set, so a test can decide a second batch while the first commits."""

    def __init__(self) -> None:
        self.prepared: list[list[Any]] = []
        self.committed: list[list[Any]] = []
        self.forgotten: list[set[str]] = []
        self.fail_prepare: set[str] = set()
        self.fail_commit: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.commit_started = threading.Event()
        self.recovered: list[Exception] = []
        self.short: set[str] = set()  # event ids whose prepare raises ShortLease (until recovered)
        self.prefetch_due = False
        self.prefetch_fails = False
        self.prefetches = 0
        self.decide_at_most = 0  # > 0: each batch decides only this many events and defers the rest
        self.offsets: list[dict[int, str]] = []
        self.rejected: list[dict[int, list[bytes]]] = []

    def prepare(self, events: list[Any]) -> Batch:
        self.prepared.append(list(events))
        for e in events:
            if e["id"] in self.short:
                self.short.discard(e["id"])
                self.fail_prepare.add(e["id"])
                raise ShortLease(e["id"])
        if any(e["id"] in self.fail_prepare for e in events):
            raise RuntimeError("decide failed")
        if self.decide_at_most and len(events) > self.decide_at_most:  # the decide time ran out
            done = events[:self.decide_at_most]
            return Batch([{"id": e["id"], "status": "applied"} for e in done], {e["user"] for e in done}, done,
                         len(events) - len(done))
        return Batch([{"id": e["id"], "status": "applied"} for e in events], {e["user"] for e in events}, events)

    def commit(self, batch: Batch, offsets: dict[int, str], rejected: dict[int, list[bytes]]) -> None:
        self.offsets.append(offsets)
        self.rejected.append(rejected)
        self.commit_started.set()
        self.gate.wait(5)
        if any(e["id"] in self.fail_commit for e in batch.events):
            raise ConnectionError("redis went away")
        self.committed.append([e["id"] for e in batch.events])

    def forget(self, keys: set[str]) -> None:
        self.forgotten.append(set(keys))

    def keys_of(self, events: list[Any]) -> set[str]:
        return {e["user"] for e in events}

    def recover(self, error: Exception) -> bool:
        self.recovered.append(error)
        if isinstance(error, ShortLease):
            self.fail_prepare.discard(error.event_id)  # leased more: the batch can be decided now
            return True
        return False

    def needs_prefetch(self) -> bool:
        return self.prefetch_due

    def prefetch(self) -> None:
        self.prefetches += 1
        self.prefetch_due = False
        if self.prefetch_fails:
            raise ConnectionError("redis down while leasing")


def ev(i: int, user: str = "u1") -> dict[str, Any]:
    return {"id": f"e{i}", "user": user}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_concurrent_callers_share_one_batch_and_each_gets_its_own_results_in_order() -> None:
    core = FakeCore()

    async def main() -> list[Any]:
        b = MicroBatcher(core, max_events=100, max_wait_s=0.01)
        return await asyncio.gather(b.submit([ev(1), ev(2)]), b.submit([ev(3)]), b.submit([ev(4), ev(5)]))

    a, b, c = run(main())
    assert [r["id"] for r in a] == ["e1", "e2"] and [r["id"] for r in b] == ["e3"]
    assert [r["id"] for r in c] == ["e4", "e5"]
    assert core.committed == [["e1", "e2", "e3", "e4", "e5"]]


def test_batches_are_cut_at_max_events_without_splitting_a_caller() -> None:
    core = FakeCore()

    async def main() -> None:
        b = MicroBatcher(core, max_events=3, max_wait_s=0.01)
        await asyncio.gather(b.submit([ev(1), ev(2)]), b.submit([ev(3), ev(4)]), b.submit([ev(5)]))

    run(main())
    assert core.committed == [["e1", "e2"], ["e3", "e4", "e5"]]


def test_a_failed_prepare_fails_its_callers_only_and_the_next_batch_commits() -> None:
    core = FakeCore()
    core.fail_prepare = {"e1"}

    async def main() -> list[Any]:
        b = MicroBatcher(core, max_events=100, max_wait_s=0)
        with pytest.raises(RuntimeError, match="decide failed"):
            await b.submit([ev(1)])
        return await b.submit([ev(2)])

    assert [r["id"] for r in run(main())] == ["e2"]
    assert core.committed == [["e2"]]


def test_when_a_batch_of_several_callers_fails_each_is_decided_alone_and_only_the_failing_one_gets_the_error(
        ) -> None:
    core = FakeCore()
    core.fail_prepare = {"e3"}  # a bug that one caller's event triggers

    async def main() -> list[Any]:
        b = MicroBatcher(core, max_events=100, max_wait_s=0.01)
        return await asyncio.gather(b.submit([ev(1), ev(2, "u2")]), b.submit([ev(3, "u3")]),
                                    b.submit([ev(4), ev(5, "u5")]), return_exceptions=True)

    first, bad, last = run(main())
    assert [r["id"] for r in first] == ["e1", "e2"] and [r["id"] for r in last] == ["e4", "e5"]
    assert isinstance(bad, RuntimeError) and "decide failed" in str(bad)
    assert [[e["id"] for e in p] for p in core.prepared] == [["e1", "e2", "e3", "e4", "e5"], ["e1", "e2"],
                                                              ["e3"], ["e4", "e5"]]  # alone, in order
    assert core.committed == [["e1", "e2"], ["e4", "e5"]]
    assert {"u1", "u2", "u3", "u5"} <= core.forgotten[0]  # the failed batch left no trace


def test_a_failed_commit_fails_the_batch_decided_on_top_of_it_and_forgets_both_batches_users() -> None:
    core = FakeCore()
    core.fail_commit = {"e1"}
    core.gate.clear()

    async def main() -> tuple[BaseException | None, BaseException | None, list[Any]]:
        b = MicroBatcher(core, max_events=1, max_wait_s=0)
        first = asyncio.ensure_future(b.submit([ev(1, "alice")]))
        await asyncio.to_thread(core.commit_started.wait, 5)  # batch 1 is committing and holds the gate
        second = asyncio.ensure_future(b.submit([ev(2, "bob")]))
        while len(core.prepared) < 2:  # batch 2 is decided on top of the uncommitted batch 1
            await asyncio.sleep(0.001)
        core.gate.set()
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        after = await b.submit([ev(3, "carol")])  # the batcher goes on
        return outcomes[0], outcomes[1], after

    err1, err2, after = run(main())
    assert isinstance(err1, ConnectionError)
    assert isinstance(err2, BatcherError) and "previous batch failed" in str(err2)
    assert {"alice"} in core.forgotten and {"bob"} in core.forgotten
    assert core.committed == [["e3"]] and after[0]["id"] == "e3"


def test_the_loop_dying_fails_every_waiter_forgets_undecided_users_and_the_next_submit_restarts_it() -> None:
    core = FakeCore()
    core.gate.clear()

    async def main() -> tuple[list[BaseException | Any], list[Any], MicroBatcher[Batch]]:
        b = MicroBatcher(core, max_events=1, max_wait_s=0)
        first = asyncio.ensure_future(b.submit([ev(1, "alice")]))
        await asyncio.to_thread(core.commit_started.wait, 5)  # batch 1 is committing and holds the gate
        committer = b._committer
        b._committer = ThreadPoolExecutor(1)
        b._committer.shutdown()  # a bug: the next commit cannot be scheduled, which kills the loop
        second = asyncio.ensure_future(b.submit([ev(2, "bob")]))
        while len(core.prepared) < 2:
            await asyncio.sleep(0.001)
        core.gate.set()
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        b._committer = committer
        await asyncio.sleep(0.05)  # the commit in flight settles; only then are its users forgotten
        after = await b.submit([ev(3, "carol")])
        return outcomes, after, b

    outcomes, after, b = run(main())
    assert isinstance(outcomes[0], list) and outcomes[0][0]["id"] == "e1"  # settled before the loop died
    assert isinstance(outcomes[1], BatcherError) and "loop died" in str(outcomes[1]), outcomes
    assert {"bob"} in core.forgotten  # decided but never committed: forgotten, so a retry reloads bob
    assert b.loop_deaths == 1
    assert after[0]["id"] == "e3" and core.committed == [["e1"], ["e3"]]


def test_on_committed_failing_does_not_fail_a_committed_batch() -> None:
    core = FakeCore()

    def broken(_: Any) -> None:
        raise ValueError("metrics bug")

    async def main() -> list[Any]:
        b = MicroBatcher(core, max_events=10, max_wait_s=0, on_committed=broken)
        return await b.submit([ev(1)])

    assert run(main())[0]["status"] == "applied"


def test_drain_waits_for_queued_batches() -> None:
    core = FakeCore()

    async def main() -> None:
        b = MicroBatcher(core, max_events=1, max_wait_s=0)
        tasks = [asyncio.ensure_future(b.submit([ev(i)])) for i in range(5)]
        await asyncio.sleep(0)
        await b.drain()
        assert all(t.done() for t in tasks)

    run(main())
    assert len(core.committed) == 5


def test_a_failed_prepare_forgets_every_user_it_touched_once_the_commit_in_flight_has_settled() -> None:
    core = FakeCore()
    core.fail_prepare = {"e2"}
    core.gate.clear()

    async def main() -> tuple[list[Any], BaseException | None, list[set[str]]]:
        b = MicroBatcher(core, max_events=1, max_wait_s=0)
        first = asyncio.ensure_future(b.submit([ev(1, "alice")]))
        await asyncio.to_thread(core.commit_started.wait, 5)
        second = asyncio.ensure_future(b.submit([ev(2, "alice")]))
        while len(core.prepared) < 2:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)
        forgotten_while_committing = list(core.forgotten)
        core.gate.set()
        a, e = await asyncio.gather(first, second, return_exceptions=True)
        assert isinstance(e, RuntimeError)
        return a, e, forgotten_while_committing

    first, _, early = run(main())
    assert first[0]["id"] == "e1"  # the commit in flight is answered normally
    assert early == []  # nothing was forgotten before that commit settled
    assert core.forgotten == [{"alice"}]  # then the failed batch's user is forgotten, to be reloaded


def test_a_prepare_that_recover_can_fix_is_decided_again() -> None:
    core = FakeCore()
    core.short = {"e1"}

    async def main() -> list[Any]:
        return await MicroBatcher(core, max_events=10, max_wait_s=0).submit([ev(1, "alice")])

    assert run(main())[0]["id"] == "e1"
    assert [type(e).__name__ for e in core.recovered] == ["ShortLease"]
    assert core.forgotten == [{"alice"}] and core.committed == [["e1"]]


def test_an_error_that_recover_cannot_fix_fails_the_callers_without_a_second_decide() -> None:
    core = FakeCore()
    core.fail_prepare = {"e1"}

    async def main() -> None:
        with pytest.raises(RuntimeError, match="decide failed"):
            await MicroBatcher(core, max_events=10, max_wait_s=0).submit([ev(1, "alice")])

    run(main())
    assert len(core.prepared) == 1 and len(core.recovered) == 1


def test_a_failing_prefetch_does_not_fail_the_batch() -> None:
    core = FakeCore()
    core.prefetch_due = True
    core.prefetch_fails = True

    async def main() -> list[Any]:
        return await MicroBatcher(core, max_events=10, max_wait_s=0).submit([ev(1)])

    assert run(main())[0]["id"] == "e1" and core.prefetches == 1


def test_a_caller_whose_batch_never_settles_gets_an_error_after_the_answer_timeout() -> None:
    core = FakeCore()
    core.gate.clear()

    async def main() -> None:
        b = MicroBatcher(core, max_events=10, max_wait_s=0, answer_timeout_s=0.2)
        with pytest.raises(BatcherError, match="no answer within 0.2 s"):
            await b.submit([ev(1)])
        core.gate.set()

    run(main())


def test_deferred_events_go_back_in_order_and_each_caller_is_answered_once_all_its_events_are() -> None:
    core = FakeCore()
    core.decide_at_most = 2

    async def main() -> list[Any]:
        b = MicroBatcher(core, max_events=100, max_wait_s=0.01)
        return await asyncio.gather(b.submit([ev(1), ev(2), ev(3)]), b.submit([ev(4)]), b.submit([ev(5), ev(6)]))

    a, b, c = run(main())
    assert [r["id"] for r in a] == ["e1", "e2", "e3"] and [r["id"] for r in b] == ["e4"]
    assert [r["id"] for r in c] == ["e5", "e6"]
    assert core.committed == [["e1", "e2"], ["e3", "e4"], ["e5", "e6"]]  # order kept across batches


def test_when_a_caller_s_first_part_fails_its_deferred_rest_is_not_applied() -> None:
    core = FakeCore()
    core.decide_at_most = 2
    core.fail_commit = {"e1"}

    async def main() -> BaseException | list[Any]:
        b = MicroBatcher(core, max_events=100, max_wait_s=0)
        out: BaseException | list[Any] = (await asyncio.gather(b.submit([ev(1), ev(2), ev(3)]),
                                                              return_exceptions=True))[0]
        await b.drain()
        return out

    assert isinstance(run(main()), ConnectionError)
    assert ["e3"] not in core.committed and all("e3" not in c for c in core.committed)


def test_an_input_offset_is_committed_with_the_last_part_of_its_events() -> None:
    core = FakeCore()
    core.decide_at_most = 2

    async def main() -> None:
        b = MicroBatcher(core, max_events=100, max_wait_s=0.01)
        await asyncio.gather(b.submit([ev(1), ev(2), ev(3)], offset=(7, "5-0"), rejected=[b"bad"]),
                             b.submit([ev(4)], offset=(9, "8-1")))

    run(main())
    assert core.committed == [["e1", "e2"], ["e3", "e4"]]
    assert core.offsets == [{}, {7: "5-0", 9: "8-1"}]
    assert core.rejected == [{}, {7: [b"bad"]}]


def test_a_barrier_returns_once_earlier_batches_committed_and_later_submissions_do_not_hold_it() -> None:
    """What a key-group release waits on: everything submitted before it committed, nothing submitted after."""
    core = FakeCore()
    core.gate.clear()  # the first batch's commit hangs until the gate opens

    async def main() -> tuple[list[list[Any]], bool]:
        b = MicroBatcher(core, max_events=100, max_wait_s=0.001)
        first = asyncio.ensure_future(b.submit([ev(1)]))
        while not core.commit_started.is_set():
            await asyncio.sleep(0.001)
        barrier = asyncio.ensure_future(b.barrier())
        later = asyncio.ensure_future(b.submit([ev(2)]))  # after the barrier began
        await asyncio.sleep(0.05)
        held = not barrier.done()  # the first commit has not ended
        core.gate.set()
        await barrier
        seen = [list(c) for c in core.committed]
        await asyncio.gather(first, later)
        return seen, held

    seen, held = run(main())
    assert held
    assert seen[0] == ["e1"]
