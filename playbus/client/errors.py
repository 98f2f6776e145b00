"""Errors of the producer client: one root."""

from __future__ import annotations

__all__ = ["ClientClosedError", "DeliveryError", "PlaybusClientError", "RequestRejectedError"]


class PlaybusClientError(Exception):
    """Root of the client's errors."""


class RequestRejectedError(PlaybusClientError):
    """playbus refused the request for good (400 unparseable, 413 too large, other 4xx); resending won't help."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"playbus answered {status}: {reason}")
        self.status = status
        self.reason = reason


class DeliveryError(PlaybusClientError):
    """Every attempt failed (connection errors, timeouts, 5xx); the event may or may not have been applied.

    Resending it with the same id is safe: it is answered `duplicate` if it was.
    """


class ClientClosedError(PlaybusClientError):
    """send() after close()."""
