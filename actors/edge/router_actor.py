"""The Ray actor that routes `playbus:in` into the input partitions (InputRouter), supervised."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from playbus.actors.service.input_router import InputRouter
from playbus.config.schema import Config

__all__ = ["InputRouterActor"]

log = logging.getLogger("playbus.router")


class _InputRouterActor:
    """Runs the router's loop: a loop that dies is logged and started again after a pause."""

    def __init__(self, config: Config, redis_url: str) -> None:
        self.router = InputRouter(redis_url, config.key_groups)
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
                await self.router.run(stop)
            except Exception as e:  # noqa: BLE001 - a bug or a lost Redis: log, pause, read again
                self.restarts += 1
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                log.exception("input router loop died (restart %d in 1 s)", self.restarts)
                await asyncio.sleep(1.0)

    async def health(self) -> dict[str, Any]:
        await self.start()  # after a restart by Ray, the loop starts again here
        running = self._task is not None and not self._task.done()
        return {"ok": running, "problems": [] if running else ["the input router loop is not running"],
                "restarts": self.restarts, "last_error": self.last_error or self.router.last_error,
                **self.router.stats}

    async def stats(self) -> dict[str, int]:
        return dict(self.router.stats)

    async def stop(self) -> dict[str, int]:
        if self._stop is not None and self._task is not None:
            self._stop.set()
            await self._task
        return dict(self.router.stats)


InputRouterActor: Any = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(_InputRouterActor)
