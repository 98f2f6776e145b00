"""Script versions: every version of every script, which one is active, one compiled object per version."""

from __future__ import annotations

from playbus.scripting.errors import ScriptNotFoundError
from playbus.scripting.sandbox import Sandbox

__all__ = ["ScriptRegistry"]


class ScriptRegistry:
    """Versions are numbered from 1 per script name; a rule runs its script's active version."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        self._sources: dict[str, dict[int, str]] = {}
        self._active: dict[str, int] = {}
        self._handles: dict[tuple[str, int], int] = {}

    def add(self, name: str, source: str, version: int | None = None) -> int:
        """Compile and store a new version (raises ScriptCompileError); returns its number."""
        versions = self._sources.setdefault(name, {})
        v = version if version is not None else max(versions, default=0) + 1
        if v in versions:
            if versions[v] == source:
                return v
            raise ScriptNotFoundError(f"{name} version {v} exists with other source", name, v)
        self._handles[(name, v)] = self._sandbox.compile(name, source, v)
        versions[v] = source
        if name not in self._active:
            self._active[name] = v
        return v

    def activate(self, name: str, version: int) -> int:
        """Make `version` the active one; returns its compiled handle."""
        self.source(name, version)
        self._active[name] = version
        return self._handles[(name, version)]

    def active(self, name: str) -> tuple[int, int]:
        """(version, compiled handle) of the active version."""
        if name not in self._active:
            raise ScriptNotFoundError(f"no script named {name!r}", name)
        v = self._active[name]
        return v, self._handles[(name, v)]

    def handle(self, name: str, version: int) -> int:
        self.source(name, version)
        return self._handles[(name, version)]

    def source(self, name: str, version: int) -> str:
        try:
            return self._sources[name][version]
        except KeyError:
            raise ScriptNotFoundError(f"script {name!r} has no version {version}", name, version) from None

    def versions(self, name: str) -> dict[int, str]:
        if name not in self._sources:
            raise ScriptNotFoundError(f"no script named {name!r}", name)
        return dict(self._sources[name])

    def names(self) -> list[str]:
        return sorted(self._sources)
