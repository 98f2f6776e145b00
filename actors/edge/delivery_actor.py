"""DeliveryActor: the Ray edge around Deliverer; a Redis client from a URL, the delivery loop in the background.

The loop (asyncio, in its own thread) starts in __init__, so an actor that Ray restarts after a crash
(max_restarts=-1) resumes delivering without anyone calling it; its predecessor's in-flight entries are
claimed back from the outbox after `claim_idle_s`. The methods stay plain and synchronous.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
import redis

from playbus.actors.service.delivery import Deliverer
from playbus.config.schema import Config

__all__ = ["DeliveryActor"]

_log = logging.getLogger(__name__)


class _DeliveryActor:
    """Delivers the outboxes of `key_groups` (default: all the config's groups) as consumer `consumer`."""

    def __init__(
        self,
        redis_url: str,
        config: Config,
        consumer: str = "delivery-0",
        key_groups: list[int] | None = None,
        **options: Any,
    ) -> None:
        client = redis.Redis.from_url(redis_url)
        groups = key_groups if key_groups is not None else config.key_groups
        self._deliverer = Deliverer(client, config.targets, groups, consumer, **options)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"delivery-{consumer}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self._deliverer.run_forever()
            except Exception:  # a bug or a lost Redis: log, pause, go on; pending entries wait in Redis
                _log.exception("delivery loop failed; restarting it in 1 s")
                time.sleep(1.0)

    def stats(self) -> dict[str, int]:
        """delivered / retried / dead / claimed since this actor started, and running (1 or 0)."""
        return {**self._deliverer.stats(), "running": int(self._thread.is_alive())}

    def stop(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Stop reading; let in-flight attempts finish and settle (up to timeout_s); the final stats."""
        self._stopped.set()
        self._deliverer.stop()
        self._thread.join(timeout_s)
        return self.stats()


DeliveryActor: Any = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_DeliveryActor)
