"""Where playbus's actors run on a Ray cluster of several nodes.

- The shards spread evenly over the alive nodes: shard i prefers node i mod n (a *soft* node affinity, so that
  Ray restarts a shard whose node is lost on a surviving node). Ray 2.60 places an actor that asks for no resource
  at all (num_cpus=0) on a random node whatever its strategy, soft affinity and SPREAD included (only a hard
  affinity is honoured: `cluster_resource_scheduler.cc`, "actor_creation && resource_request.IsEmpty()"), and a
  random draw of 4 shards over 2 nodes was 3+1 or 4+0 in half of the tries here; so a shard asks for a token
  SHARD_CPUS of a CPU, which makes Ray apply its strategy and costs nothing that matters.
- What serves the driver (the ingress replica, which listens on the port run_cluster prints, the input router,
  delivery) runs on the driver's own node, by the node's `ray.io/node-id` label: a hard constraint, which asks for
  no CPU; if that node is lost, the driver is lost with it, and these actors (owned by the driver) too.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["SHARD_CPUS", "alive_nodes", "driver_node", "pinned_to", "shard_options"]

SHARD_CPUS = 0.01  # not a budget (a busy shard uses a whole core): only makes Ray honour the shard's placement
NODE_ID_LABEL = "ray.io/node-id"


def alive_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the cluster, by node id."""
    return sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"])  # type: ignore[no-untyped-call]


def driver_node() -> str:
    """Node id of this driver's node (the head node when several nodes run on this machine: Ray prefers it)."""
    return str(ray.get_runtime_context().get_node_id())


def shard_options(i: int) -> dict[str, Any]:
    """Ray options of shard i: a soft affinity to alive node i mod n (of those with a CPU to give), and the token
    CPU that makes Ray honour it. With no such node (every node has num-cpus 0), no preference."""
    nodes = [n["NodeID"] for n in alive_nodes() if n.get("Resources", {}).get("CPU", 0) >= SHARD_CPUS]
    if not nodes:
        return {}
    return {"num_cpus": SHARD_CPUS,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True)}


def pinned_to(node_id: str) -> dict[str, Any]:
    """Ray options (also valid as a Serve deployment's ray_actor_options) that keep an actor on `node_id`."""
    return {"num_cpus": 0, "label_selector": {NODE_ID_LABEL: node_id}}
