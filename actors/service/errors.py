"""Errors of the service layer: one root, plain-string fields so they pickle across actors."""

from __future__ import annotations

from playbus.actors.engine.errors import PlaybusError

__all__ = ["NotOwner", "ServiceError"]


class ServiceError(PlaybusError):
    """Root of the errors raised by the plain-Python services (batcher, ingress, delivery)."""


class NotOwner(ServiceError):
    """A shard was given events of key groups it does not own (the shard map changed: a rescale, a takeover).
    Nothing of the call was decided; the caller reads the shard map again and sends the events to their owner."""
