"""Errors of the playbus command line: one root, a plain message so it prints as one line."""

from __future__ import annotations

__all__ = ["CliError"]


class CliError(Exception):
    """A problem the user must fix; printed as one line, exit code 2."""
