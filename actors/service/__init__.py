"""Plain-Python compositions that the Ray actors wrap: shard core, batcher, partition reader, input router, HTTP API,
delivery."""

from __future__ import annotations

from playbus.actors.service.delivery import Deliverer
from playbus.actors.service.http_api import IngressCore
from playbus.actors.service.input_router import InputRouter
from playbus.actors.service.partition_reader import PartitionReader
from playbus.actors.service.router import Router
from playbus.actors.service.shard import ShardCore

__all__ = ["Deliverer", "IngressCore", "InputRouter", "PartitionReader", "Router", "ShardCore"]
