"""The producer client of playbus, for gameplay services: batched HTTP (`PlaybusClient`) and bulk Redis streams
(`StreamProducer`). It needs msgpack (and redis-py for StreamProducer), never Ray, lupa or the server: install
it alone with `pip install clients/python` (the `playbus-client` distribution), or it comes with playbus.
"""

from __future__ import annotations

from playbus.client.errors import ClientClosedError, DeliveryError, PlaybusClientError, RequestRejectedError
from playbus.client.http import MAX_EVENTS_PER_REQUEST, PlaybusClient, Result
from playbus.client.streams import StreamProducer

__all__ = [
    "MAX_EVENTS_PER_REQUEST",
    "ClientClosedError",
    "DeliveryError",
    "PlaybusClient",
    "PlaybusClientError",
    "RequestRejectedError",
    "Result",
    "StreamProducer",
]
