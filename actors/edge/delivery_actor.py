"""DeliveryActor: the Ray edge around Deliverer; a Redis client from a URL (one server or a Redis Cluster), the
delivery loop in the background.

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
from ray.util import metrics

from playbus.actors.service.delivery import Deliverer
from playbus.actors.store.connect import connect
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
        client = connect(redis_url)
        groups = key_groups if key_groups is not None else config.key_groups
        self._deliverer = Deliverer(client, config.targets, groups, consumer, **options)
        self._stopped = threading.Event()
        self.restarts = 0
        self.last_error = ""
        self._m = metrics.Counter("playbus_deliveries", "action deliveries by target and outcome",
                                  tag_keys=("target", "outcome"))
        self._exported: dict[tuple[str, str], int] = {}
        self._thread = threading.Thread(target=self._loop, name=f"delivery-{consumer}", daemon=True)
        self._thread.start()
        threading.Thread(target=self._export, name="delivery-metrics", daemon=True).start()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self._deliverer.run_forever()
            except Exception as e:  # a bug or a lost Redis: log, pause, go on; pending entries wait in Redis
                self.restarts += 1
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                _log.exception("delivery loop failed; restarting it in 1 s")
                time.sleep(1.0)

    def _export(self) -> None:
        """Delivery counts per target as Ray metrics (delivered, retried, dead), every few seconds."""
        while not self._stopped.wait(2.0):
            for target, counts in list(self._deliverer.by_target.items()):
                for outcome, n in counts.items():
                    last = self._exported.get((target, outcome), 0)
                    if n > last:
                        self._m.inc(n - last, tags={"target": target, "outcome": outcome})
                        self._exported[(target, outcome)] = n

    def stats(self) -> dict[str, int]:
        """delivered / retried / dead / claimed since this actor started, and running (1 or 0)."""
        return {**self._deliverer.stats(), "running": int(self._thread.is_alive())}

    def health(self) -> dict[str, Any]:
        running = self._thread.is_alive()
        return {"ok": running, "problems": [] if running else ["the delivery loop is not running"],
                "restarts": self.restarts, "last_error": self.last_error, **self._deliverer.stats(),
                "by_target": self._deliverer.by_target}

    def stop(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Stop reading; let in-flight attempts finish and settle (up to timeout_s); the final stats."""
        self._stopped.set()
        self._deliverer.stop()
        self._thread.join(timeout_s)
        return self.stats()


DeliveryActor: Any = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_DeliveryActor)
