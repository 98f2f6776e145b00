"""Errors of the service layer: one root, plain-string fields so they pickle across actors."""

from __future__ import annotations

from playbus.actors.engine.errors import PlaybusError

__all__ = ["ServiceError"]


class ServiceError(PlaybusError):
    """Root of the errors raised by the plain-Python services (batcher, ingress, delivery)."""
