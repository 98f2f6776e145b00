"""PlaybusClient: events sent one by one, batched into `POST /v1/events` requests (msgpack) with retries.

Only the standard library (http.client, one kept-alive connection) plus msgpack. Retries resend the same
events with the same ids: playbus dedups on the id, so a retried event is applied at most once and answered
`applied` or `duplicate`, never lost.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import msgpack

from playbus.client.errors import ClientClosedError, DeliveryError, PlaybusClientError, RequestRejectedError

__all__ = ["MAX_EVENTS_PER_REQUEST", "PlaybusClient", "Result"]

MAX_EVENTS_PER_REQUEST = 1000  # CONTRACT.md: POST /v1/events takes at most 1000 events
Result = dict[str, Any]


class _Item:
    __slots__ = ("packed", "future", "seq")

    def __init__(self, packed: bytes, future: Future[Result], seq: int) -> None:
        self.packed = packed
        self.future = future
        self.seq = seq


class _Retryable(Exception):
    """One attempt failed in a way worth retrying; `wait_s` is the server's Retry-After, if any."""

    def __init__(self, reason: str, wait_s: float = 0.0, connection: bool = False) -> None:
        super().__init__(reason)
        self.wait_s = wait_s
        self.connection = connection


class PlaybusClient:
    """Batches events sent one by one into `POST /v1/events` requests (msgpack) from a background thread.

    `send(event)` returns a Future resolved with that event's result dict (`{"id", "status", "actions",
    "errors"}`), or with RequestRejectedError / DeliveryError. A batch leaves when it holds `max_batch`
    events or its oldest event has waited `linger_ms`. Futures are resolved from the sender thread.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        linger_ms: float = 5,
        max_batch: int = 500,
        max_retries: int = 8,
        timeout_s: float = 30.0,
        backoff_s: float = 0.05,
        max_backoff_s: float = 5.0,
        max_retry_after_s: float = 30.0,
        max_pending: int = 100_000,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not 1 <= max_batch <= MAX_EVENTS_PER_REQUEST:
            raise ValueError(f"max_batch must be 1..{MAX_EVENTS_PER_REQUEST}, got {max_batch}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port][/prefix], got {url!r}")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path.rstrip("/") + "/v1/events"
        self.linger_s = linger_ms / 1000.0
        self.max_batch = max_batch
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.max_pending = max_pending
        self._headers = {"Content-Type": "application/msgpack", "Accept": "application/json",
                         "Connection": "keep-alive", **(headers or {})}
        self._conn: http.client.HTTPConnection | None = None
        self._cv = threading.Condition()
        self._pending: deque[tuple[_Item, float]] = deque()  # (item, enqueue time)
        self._seq = 0  # last sequence number handed out
        self._done = 0  # every item with seq <= _done is resolved (batches go out and end in order)
        self._urgent = 0  # items with seq <= _urgent leave without lingering (flush, send_many)
        self._closing = False
        self.requests = 0  # HTTP requests made, retries included
        self.retries = 0
        self._thread = threading.Thread(target=self._run, name="playbus-client", daemon=True)
        self._thread.start()

    # -- the producer's side -----------------------------------------------------------------------
    def send(self, event: dict[str, Any]) -> Future[Result]:
        """Queue one event; the Future resolves with its result. Blocks while `max_pending` events wait."""
        fut: Future[Result] = Future()
        try:
            packed = msgpack.packb(event)
        except (TypeError, ValueError, OverflowError) as e:
            fut.set_exception(RequestRejectedError(400, f"event cannot be encoded as msgpack: {e}"))
            return fut
        with self._cv:
            while len(self._pending) >= self.max_pending and not self._closing:
                self._cv.wait()
            if self._closing:
                raise ClientClosedError("the client is closed")
            self._seq += 1
            self._pending.append((_Item(packed, fut, self._seq), time.monotonic()))
            if len(self._pending) == 1 or len(self._pending) >= self.max_batch:
                self._cv.notify_all()
        return fut

    def send_many(self, events: Iterable[dict[str, Any]], timeout: float | None = None) -> list[Result]:
        """Send events without lingering and wait for their results (in order); raises the first failure."""
        futures = [self.send(e) for e in events]
        self._hurry()
        return [f.result(timeout) for f in futures]

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued so far without lingering; wait until it is resolved (False on timeout)."""
        target = self._hurry()
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._done < target:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the sender thread and close the connection. Further send() raises ClientClosedError."""
        if self._thread.is_alive():
            self.flush(timeout)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> PlaybusClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _hurry(self) -> int:
        with self._cv:
            self._urgent = max(self._urgent, self._seq)
            self._cv.notify_all()
            return self._seq

    # -- the sender thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                try:
                    self._deliver(batch)
                except Exception as e:  # noqa: BLE001 - never leave a future unresolved
                    self._fail(batch, DeliveryError(f"client error: {type(e).__name__}: {e}"))
                with self._cv:
                    self._done = batch[-1].seq
                    self._cv.notify_all()
        finally:
            self._close_conn()
            with self._cv:
                leftover = [item for item, _ in self._pending]
                self._pending.clear()
                self._done = self._seq
                self._cv.notify_all()
            self._fail(leftover, ClientClosedError("the client was closed before this event was sent"))

    def _next_batch(self) -> list[_Item] | None:
        """The next batch once it is full, its oldest event has lingered enough, or someone is waiting."""
        with self._cv:
            while True:
                if self._pending:
                    first, since = self._pending[0]
                    wait = since + self.linger_s - time.monotonic()
                    if (len(self._pending) >= self.max_batch or wait <= 0 or first.seq <= self._urgent
                            or self._closing):
                        n = min(len(self._pending), self.max_batch)
                        batch = [self._pending.popleft()[0] for _ in range(n)]
                        self._cv.notify_all()  # room for producers blocked on max_pending
                        return batch
                    self._cv.wait(wait)
                elif self._closing:
                    return None
                else:
                    self._cv.wait()

    def _deliver(self, batch: list[_Item]) -> None:
        """POST one batch with retries; on 400/413 split it so that only the bad events fail."""
        body = _pack_array([item.packed for item in batch])
        try:
            results = self._post_with_retries(body, len(batch))
        except RequestRejectedError as e:
            if len(batch) > 1 and e.status in (400, 413):
                half = len(batch) // 2
                self._deliver(batch[:half])
                self._deliver(batch[half:])
            else:
                self._fail(batch, e)
            return
        except PlaybusClientError as e:
            self._fail(batch, e)
            return
        for item, result in zip(batch, results, strict=True):
            with contextlib.suppress(InvalidStateError):  # the producer cancelled it
                item.future.set_result(result)

    def _post_with_retries(self, body: bytes, n: int) -> list[Result]:
        attempt = 0
        while True:
            fresh = self._conn is None
            try:
                return self._post_once(body, n)
            except _Retryable as e:
                self._close_conn()
                if e.connection and not fresh and attempt == 0:
                    # A kept-alive connection the server had closed meanwhile: reconnect at once.
                    fresh = True
                    attempt += 1
                    self.retries += 1
                    continue
                if attempt >= self.max_retries:
                    raise DeliveryError(f"gave up after {attempt + 1} attempts: {e}") from None
                delay = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
                delay = delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - jitter, not security
                time.sleep(max(delay, min(e.wait_s, self.max_retry_after_s)))
                attempt += 1
                self.retries += 1

    def _post_once(self, body: bytes, n: int) -> list[Result]:
        conn = self._connection()
        self.requests += 1
        try:
            conn.request("POST", self._path, body, self._headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise _Retryable(f"{type(e).__name__}: {e}", connection=True) from None
        if resp.will_close:
            self._close_conn()
        status = resp.status
        if status == 200:
            return self._results(resp.getheader("Content-Type", ""), data, n)
        reason = _reason(data)
        if status in (429, 503):
            raise _Retryable(f"{status}: {reason}", _retry_after(resp.getheader("Retry-After")))
        if status >= 500 or status == 408:
            raise _Retryable(f"{status}: {reason}")
        raise RequestRejectedError(status, reason)

    @staticmethod
    def _results(ctype: str, data: bytes, n: int) -> list[Result]:
        try:
            if "msgpack" in ctype:
                doc = msgpack.unpackb(data, raw=False, strict_map_key=False)
            else:
                doc = json.loads(data)
            results = doc["results"]
        except Exception as e:  # noqa: BLE001 - a garbled answer is a server fault: retry
            raise _Retryable(f"unreadable 200 answer: {type(e).__name__}: {e}") from None
        if not isinstance(results, list) or len(results) != n:
            got = len(results) if isinstance(results, list) else type(results).__name__
            raise _Retryable(f"200 answer with {got} results for {n} events")
        return results

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout_s)
        return self._conn

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @staticmethod
    def _fail(items: Iterable[_Item], error: BaseException) -> None:
        for item in items:
            with contextlib.suppress(InvalidStateError):
                item.future.set_exception(error)


def _pack_array(packed: Sequence[bytes]) -> bytes:
    """A msgpack array of already-packed events (each event is packed once, in the producer's thread)."""
    header: bytes = msgpack.Packer().pack_array_header(len(packed))
    return header + b"".join(packed)


def _reason(data: bytes) -> str:
    try:
        doc = json.loads(data)
        if isinstance(doc, dict) and "error" in doc:
            return str(doc["error"])
    except (ValueError, UnicodeDecodeError):
        pass
    return data[:500].decode("utf-8", "replace") or "(empty body)"


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); 0 when absent or unreadable."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())
