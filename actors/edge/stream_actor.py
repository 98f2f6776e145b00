"""The Ray actor that runs the stream ingress loop (StreamIngress) in the background."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import ray

from playbus.actors.edge.serve_app import RETRYABLE, call_with_retry
from playbus.actors.service.errors import ServiceError
from playbus.actors.service.router import Router
from playbus.actors.service.stream_ingress import StreamIngress
from playbus.config.schema import Config

__all__ = ["StreamIngressActor"]

log = logging.getLogger("playbus.stream")


class _StreamIngressActor:
    """Runs the stream reader's loop, supervised: a loop that dies is logged and started again after a pause."""

    def __init__(self, config: Config, shards: list[Any], redis_url: str, consumer: str = "reader-0") -> None:
        self.shards = shards

        async def call(i: int, method: str, args: Sequence[Any]) -> Any:
            try:
                return await call_with_retry(self.shards[i], method, args, deadline_s=60.0)
            except RETRYABLE as e:  # still restarting after the deadline: an outage, not the entries' fault
                raise ServiceError(f"shard {i} unavailable: {type(e).__name__}") from e

        self.reader = StreamIngress(redis_url, Router(config.shards, config.key_groups), call, consumer)
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0
        self.last_error = ""

    async def start(self) -> bool:
        if self._task is None or self._task.done():
            self._stop = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._supervise(self._stop))
        return True

    async def _supervise(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.reader.run(stop)
            except Exception as e:  # noqa: BLE001 - a bug or a lost Redis: log, pause, read again
                self.restarts += 1
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                log.exception("stream reader loop died (restart %d in 1 s)", self.restarts)
                await asyncio.sleep(1.0)

    async def health(self) -> dict[str, Any]:
        running = self._task is not None and not self._task.done()
        problems = [] if running else ["the stream reader loop is not running"]
        return {"ok": running, "problems": problems, "restarts": self.restarts, "last_error": self.last_error,
                **self.reader.stats()}

    async def stats(self) -> dict[str, int]:
        return self.reader.stats()

    async def stop(self) -> dict[str, int]:
        if self._stop is not None and self._task is not None:
            self._stop.set()
            await self._task
        return self.reader.stats()


StreamIngressActor: Any = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(_StreamIngressActor)
