"""The edge: the only modules that import Ray (the actors, the Serve app, the cluster start-up)."""

from __future__ import annotations

__all__: list[str] = []
