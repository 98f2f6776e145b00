"""The Ray actor that runs the stream ingress loop (StreamIngress) in the background."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import ray

from playbus.actors.edge.serve_app import call_with_retry
from playbus.actors.service.router import Router
from playbus.actors.service.stream_ingress import StreamIngress
from playbus.config.schema import Config

__all__ = ["StreamIngressActor"]


class _StreamIngressActor:
    def __init__(self, config: Config, shards: list[Any], redis_url: str, consumer: str = "reader-0") -> None:
        self.shards = shards

        async def call(i: int, method: str, args: Sequence[Any]) -> Any:
            return await call_with_retry(self.shards[i], method, args, deadline_s=60.0)

        self.reader = StreamIngress(redis_url, Router(config.shards, config.key_groups), call, consumer)
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> bool:
        if self._task is None:
            self._stop = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self.reader.run(self._stop))
        return True

    async def stats(self) -> dict[str, int]:
        return self.reader.stats()

    async def stop(self) -> dict[str, int]:
        if self._stop is not None and self._task is not None:
            self._stop.set()
            await self._task
        return self.reader.stats()


StreamIngressActor: Any = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(_StreamIngressActor)
