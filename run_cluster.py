"""Start playbus on this machine (or join a Ray cluster): Redis, the shards, the ingress, delivery.

    python run_cluster.py [--config FILE] [--port N] [--redis URL] [--address RAY_ADDRESS] [--shards N]

A thin entry: the start-up lives in playbus.actors.edge.cluster (installed as the `run_cluster` command).
"""

from __future__ import annotations

import sys

from playbus.actors.edge.cluster import main

if __name__ == "__main__":
    sys.exit(main())
