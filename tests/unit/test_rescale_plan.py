"""Pure logic of a rescale: which groups move where, and the router sending refused events to their new owner."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from playbus.actors.engine.keys import contiguous_owners, key_group, user_key
from playbus.actors.service.errors import NotOwner
from playbus.actors.service.rescale import plan
from playbus.actors.service.router import Router


def test_plan_moves_only_the_groups_whose_owner_changes() -> None:
    two = contiguous_owners(2, 16)
    assert plan(two, 2) == {}
    up = plan(two, 4)
    assert up == {(0, 1): [4, 5, 6, 7], (1, 2): [8, 9, 10, 11], (1, 3): [12, 13, 14, 15]}
    down = plan(contiguous_owners(4, 16), 3)
    assert down == {(1, 0): [4, 5], (2, 1): [8, 9, 10], (3, 2): [12, 13, 14, 15]}
    after = contiguous_owners(4, 16)
    for (_a, b), groups in down.items():
        for kg in groups:
            after[kg] = b
    assert after == contiguous_owners(3, 16)
    with pytest.raises(ValueError, match="must be in 1..16"):
        plan(two, 17)


def test_events_a_shard_refuses_go_to_the_owner_of_a_fresh_map_in_request_order() -> None:
    owners_now = contiguous_owners(2, 16)
    owners_new = contiguous_owners(4, 16)
    calls: list[tuple[int, int]] = []

    async def call_shard(shard: int, method: str, args: Any) -> Any:
        events = msgspec.msgpack.decode(args[0])
        calls.append((shard, len(events)))
        for e in events:
            if owners_new[key_group(user_key(e["campaign"], e["user"]), 16)] != shard:
                raise NotOwner(f"shard {shard} does not own it")
        return msgspec.msgpack.encode([{"id": e["id"], "shard": shard} for e in events])

    router = Router(2, 16)

    async def refresh() -> None:
        router.set_owners(owners_new, 4)

    router.refresh = refresh
    router.set_owners(owners_now, 2)
    events = [{"id": f"e{i}", "campaign": "c1", "user": f"u{i}"} for i in range(40)]
    results = asyncio.run(router.dispatch(events, call_shard))
    assert [r["id"] for r in results] == [e["id"] for e in events]
    assert all(r["shard"] == owners_new[key_group(user_key("c1", e["user"]), 16)] for r, e in
               zip(results, events, strict=True))
    assert router.shards == 4 and router.rerouted > 0
    assert {s for s, _ in calls} == {0, 1, 2, 3}


def test_a_shard_that_keeps_refusing_fails_the_call_after_the_retry_time() -> None:
    async def refuse(shard: int, method: str, args: Any) -> Any:
        raise NotOwner("never the owner")

    router = Router(2, 16, retry_s=0.2)
    with pytest.raises(NotOwner):
        asyncio.run(router.dispatch([{"id": "e", "campaign": "c1", "user": "u"}], refuse))


def test_other_shard_errors_are_not_retried() -> None:
    n = 0

    async def broken(shard: int, method: str, args: Any) -> Any:
        nonlocal n
        n += 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(Router(1, 16).dispatch([{"id": "e", "campaign": "c1", "user": "u"}], broken))
    assert n == 1
