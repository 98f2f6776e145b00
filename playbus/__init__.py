"""The `playbus` command line: dry runs and script operations (the engine lives in actors/)."""

from __future__ import annotations

__all__ = ["main"]

from playbus.cli import main
