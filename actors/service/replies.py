"""HTTP replies as plain data, (status, headers, body bytes), and the API's size limits: shared by every endpoint."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["MAX_BODY", "MAX_EVENTS", "Response", "error", "reply"]

MAX_EVENTS = 1000  # events in one request
MAX_BODY = 20 * 1024 * 1024  # 1000 events of up to 16 KiB data each, plus envelopes
Response = tuple[int, dict[str, str], bytes]

_JSON = {"content-type": "application/json"}
_dumps = msgspec.json.Encoder(enc_hook=str).encode  # compact; what JSON cannot hold is shown as text


def reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    """A JSON reply."""
    h = dict(_JSON)
    if headers:
        h.update(headers)
    return status, h, _dumps(body)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """A JSON error reply: {"error": message}."""
    return reply(status, {"error": message}, headers)
