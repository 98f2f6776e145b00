"""playbus: the campaign orchestration engine. Subpackages: actors (the shards, in layers), scripting (the Lua
sandbox), config (typed configuration), client (the producer client), loadtest; `playbus.cli` is the command.

Importing `playbus` imports nothing else, so that the producer client needs neither Ray nor lupa.
"""

from __future__ import annotations

__all__: list[str] = []
