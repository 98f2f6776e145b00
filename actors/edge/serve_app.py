"""The Ray Serve deployment of the HTTP ingress: Serve at the edge, IngressCore inside."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from starlette.requests import Request
from starlette.responses import Response

from playbus.actors.edge.names import NAMESPACE, shard_name
from playbus.actors.service.http_api import MAX_BODY, IngressCore
from playbus.config.schema import Config

__all__ = ["Ingress", "call_with_retry"]

log = logging.getLogger("playbus.ingress")
RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError)


async def call_with_retry(handle: Any, method: str, args: Sequence[Any], deadline_s: float = 30.0,
                          call_timeout_s: float = 60.0) -> Any:
    """Call an actor method, retrying while Ray restarts the actor (safe: batches are idempotent by id).
    Each call waits at most `call_timeout_s` (a stopped or stuck actor answers nothing: TimeoutError)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    delay = 0.05
    while True:
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), call_timeout_s)
        except RETRYABLE as e:
            if loop.time() + delay > end:
                raise
            log.info("shard call %s failed (%s); retrying in %.2fs", method, type(e).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def _rebind_at_once() -> None:
    """Let the ingress replica that replaces a killed one listen on the port at once.

    With direct ingress the replica itself listens on the port, on a socket Ray opens without SO_REUSEADDR
    (Ray 2.60 passes `enable_so_reuseport=False`), so while the killed replica's connections sit in TIME_WAIT
    (60 s on Linux) every new replica fails to bind, and Serve blocks the port: HTTP was down for about a minute
    after a replica kill under load (the soak). This sets SO_REUSEADDR on that socket, which allows binding over
    TIME_WAIT but never beside a live listener (unlike SO_REUSEPORT, which Ray's flag would also set).
    Applied when this module is imported, which a replica does before it starts its server; a Ray without these
    internals is left as it is."""
    import socket

    try:
        from ray.serve._private import http_util, replica
    except ImportError:  # pragma: no cover - another Ray layout: nothing to mend
        return
    original = getattr(replica, "start_asgi_http_server", None)
    if original is None or getattr(original, "_playbus_rebind", False) or not hasattr(http_util,
                                                                                      "set_socket_reuse_port"):
        return

    def reuse_address(sock: socket.socket) -> bool:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return True

    async def start(*args: Any, **kwargs: Any) -> Any:
        kwargs["enable_so_reuseport"] = True  # read by start_asgi_http_server as "call set_socket_reuse_port"
        return await original(*args, **kwargs)

    start._playbus_rebind = True  # type: ignore[attr-defined]
    setattr(http_util, "set_socket_reuse_port", reuse_address)  # noqa: B010 - patching Ray's module on purpose
    setattr(replica, "start_asgi_http_server", start)  # noqa: B010


_rebind_at_once()


@serve.deployment(
    max_ongoing_requests=512,
    ray_actor_options={"num_cpus": 0},
    logging_config={"enable_access_log": False},  # no log line per request; the shards log per batch
)
class Ingress:
    """POST /v1/events and the rest of the HTTP API."""

    def __init__(self, config: Config, shards: list[Any], redis_url: str,
                 components: dict[str, Any] | None = None) -> None:
        """`components`: the background actors whose health /healthz reports (name -> actor handle)."""
        self.shards = list(shards)  # handles by shard index; a rescale's new shards are looked up by name
        self.parts = dict(components or {})

        async def call(i: int, method: str, args: Sequence[Any]) -> Any:
            handle = await self._shard(i)
            try:
                return await call_with_retry(handle, method, args)
            except ActorDiedError:
                # Removed by a rescale (and perhaps started again since, as a new actor of the same name).
                if i < len(self.shards) and self.shards[i] is handle:
                    self.shards[i] = None
                fresh = await self._shard(i)
                if fresh is handle:
                    raise
                return await call_with_retry(fresh, method, args)

        self.core = IngressCore(config, call, redis_url, components=self.component_health if self.parts else None,
                                on_map_change=self._forget_shards)

    def _forget_shards(self) -> None:
        """The shard map changed: a rescale may have ended shards and started others under the same names, so
        look every shard up by name again (a call to an ended actor would be retried for its whole deadline)."""
        self.shards = []

    async def _shard(self, i: int) -> Any:
        """The handle of shard i: the one given at start, else the named actor (started by a rescale)."""
        if i < len(self.shards) and self.shards[i] is not None:
            return self.shards[i]
        handle = await asyncio.to_thread(ray.get_actor, shard_name(i), namespace=NAMESPACE)
        self.shards += [None] * (i + 1 - len(self.shards))
        self.shards[i] = handle
        return handle

    async def component_health(self) -> dict[str, dict[str, Any]]:
        async def one(handle: Any) -> dict[str, Any]:
            try:
                h: dict[str, Any] = await asyncio.wait_for(handle.health.remote(), 5.0)
                return h
            except Exception as e:  # noqa: BLE001 - not answering is unhealthy
                return {"ok": False, "problems": [f"no answer: {type(e).__name__}: {e}"[:300]]}

        names = list(self.parts)
        return dict(zip(names, await asyncio.gather(*(one(self.parts[n]) for n in names)), strict=True))

    async def __call__(self, request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            return Response(b'{"error":"request body too large"}', status_code=413,
                            media_type="application/json")
        body = await request.body()
        # The path as sent (still percent-encoded): IngressCore decodes each segment once, so a user id
        # with "%" or "/" in it reaches the right user.
        raw_path = request.scope.get("raw_path")
        path = raw_path.decode("utf-8", "replace") if raw_path else request.url.path
        status, headers, content = await self.core.handle(
            request.method, path, request.url.query, dict(request.headers), body)
        return Response(content, status_code=status, headers=headers)

