"""Plain-Python compositions that the Ray actors wrap: shard core, router, HTTP API, stream reader, delivery."""

from __future__ import annotations

from playbus.actors.service.delivery import Deliverer
from playbus.actors.service.http_api import IngressCore
from playbus.actors.service.router import Router
from playbus.actors.service.shard import ShardCore
from playbus.actors.service.stream_ingress import StreamIngress

__all__ = ["Deliverer", "IngressCore", "Router", "ShardCore", "StreamIngress"]
