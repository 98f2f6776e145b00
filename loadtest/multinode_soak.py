"""Soak of Ray node loss (`make soak-nodes`): playbus across a Ray cluster of several nodes on this machine, HTTP
traffic checked against a reference model, and worker nodes lost one after another while it flows.

    python -m playbus.loadtest.multinode_soak [--minutes 3] [--workers 3] [--shards 8] [--every 30]
                                              [--detection fast|default] [--seed N] [--keep DIR]

Starts a head node and `--workers` worker nodes (`ray start`, loadtest/raynodes.py; the head with the GCS's
node-death detection `--detection`: `fast` = loadtest.raynodes.FAST_DETECTION, `default` = Ray's). First, with
another job's Serve application deployed on the cluster, run_cluster.py must refuse to start, naming it (it would
take that application down to serve on its own port). Then `run_cluster.py --address ... --shards N` (its own
embedded Redis), then producers (loadtest/nodeloss.py: each event applied exactly once, in order, checked at the
end). Every `--every` seconds it loses a worker node that hosts shards, in turn:

  kill    SIGKILL of every process of the node at once (the raylet, its workers, its agents): its port refuses,
          so each GCS health check fails at once;
  freeze  SIGSTOP of every process of the node (a machine that went silent, no TCP reset): each health check
          waits its timeout, and calls in flight to its actors get no answer and no error; the node stays frozen
          until the end of the run;

and starts a new worker node in its place (Ray does not move running actors onto it: the next loss is of a node
that still hosts shards, while there is one). For each loss it prints: how long the GCS took to declare the node
dead, how long until /healthz was 200 again with no shard on that node (its key groups committing on survivors),
and the longest a producer waited for a chunk's answers. At the end the model's checks, and run_cluster.py must
stop cleanly. Exit code 0 only on PASS. `--keep DIR` keeps run_cluster.py's output (DIR/cluster.log) and the nodes'
logs.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from playbus.loadtest.launcher import ClusterProcess, free_port
from playbus.loadtest.nodeloss import Traffic, healthz, wait_taken_over, write_config
from playbus.loadtest.raynodes import DEFAULT_DETECTION, DRIVER_ENV, FAST_DETECTION, LocalRayCluster, RayNode

ROOT = Path(__file__).resolve().parents[1]
TAKEOVER_TIMEOUT_S = 180.0


@dataclass
class Loss:
    kind: str
    node: str
    shards: int
    at: float
    detected_s: float | None = None
    green_s: float | None = None
    longest_wait_s: float | None = None


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shards_on(url: str) -> dict[str, int]:
    """node id -> shards on it (from /healthz)."""
    out: dict[str, int] = {}
    for s in healthz(url)[1]:
        out[s.get("node", "?")] = out.get(s.get("node", "?"), 0) + 1
    return out


def lose(cluster: LocalRayCluster, node: RayNode, kind: str, url: str, loss: Loss) -> None:
    """Lose `node` (kind: kill or freeze) and measure, into `loss`, when the GCS declares it dead (polled in a
    thread of its own: a /healthz call may take seconds) and when /healthz is green with no shard on it."""
    import threading

    loss.at = node.kill() if kind == "kill" else node.freeze()
    deadline = loss.at + TAKEOVER_TIMEOUT_S

    def detect() -> None:
        while loss.detected_s is None and time.monotonic() < deadline:
            try:
                if not cluster.alive(node):
                    loss.detected_s = time.monotonic() - loss.at
            except Exception:  # noqa: BLE001,S110 - the GCS is busy: asked again
                pass
            time.sleep(0.1)

    detector = threading.Thread(target=detect, daemon=True)
    detector.start()
    loss.green_s = wait_taken_over(url, node.node_id, loss.at, TAKEOVER_TIMEOUT_S)
    detector.join()


OTHER_APP = """\
import sys
import ray
from ray import serve
ray.init(address=sys.argv[1], namespace="other", logging_level="ERROR")
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
@serve.deployment(ray_actor_options={"num_cpus": 0})
def hello(request):
    return "hello"
serve.run(hello.bind(), name="other", route_prefix="/other")
print("ready", flush=True)
sys.stdin.readline()
serve.shutdown()
"""


def refused_beside_another_serve_app(cluster: LocalRayCluster, config: Path, base: Path) -> str | None:
    """Another job's Serve application on the cluster: run_cluster.py must refuse to start (restarting Serve with
    its own port would take that application down), with a message naming it. None when it does; else what
    happened. The other application is shut down before this returns."""
    import os
    import subprocess

    from playbus.loadtest.launcher import ClusterStartError

    env = {**os.environ, **DRIVER_ENV}
    env.pop("RAY_ADDRESS", None)
    other = subprocess.Popen([sys.executable, "-c", OTHER_APP, cluster.address, str(free_port())], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout is not None and other.stdin is not None
        if other.stdout.readline().strip() != "ready":
            return f"the other Serve application did not start (exit {other.poll()})"
        pb = ClusterProcess(config, port=free_port(), redis_dir=base / "redis-refused", shards=1, env=DRIVER_ENV,
                            cwd=ROOT, python=sys.executable, address=cluster.address)
        try:
            pb.start(timeout_s=120)
        except ClusterStartError:
            pass
        else:
            pb.stop()
            return "run_cluster.py started beside another Serve application"
        pb.stop()
        if not any("Ray Serve on this cluster runs other applications (other)" in line for line in pb.lines):
            return "run_cluster.py stopped without the message naming the other application:\n" + pb.output(10)
        return None
    finally:
        if other.stdin is not None and other.poll() is None:
            other.stdin.write("\n")
            other.stdin.flush()
        try:
            other.wait(60)
        except subprocess.TimeoutExpired:
            other.kill()


def add_worker(cluster: LocalRayCluster) -> None:
    """A new worker node; a second try if it does not come up (`ray start` gives a raylet 30 s to register with
    the GCS, which a loaded 2-core box sometimes misses); a node that did not come up is stopped with the rest."""
    for attempt in (1, 2):
        try:
            cluster.add_node(num_cpus=1, resources={"worker_node": 1}, timeout_s=120)
            return
        except RuntimeError as e:
            log(f"  a new worker node did not come up (try {attempt}): {str(e).splitlines()[-1]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--every", type=float, default=30.0, help="seconds between node losses")
    p.add_argument("--detection", choices=["fast", "default"], default="fast")
    p.add_argument("--producers", type=int, default=3)
    p.add_argument("--seed", type=int, default=int(time.time()) % 10_000)
    p.add_argument("--keep", help="keep the logs in this folder")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="pbs-", dir="/tmp"))
    detection = FAST_DETECTION if args.detection == "fast" else DEFAULT_DETECTION
    log(f"node-loss soak: seed {args.seed}, {args.minutes:g} min, head + {args.workers} workers, {args.shards} shards, "
        f"detection {args.detection} {detection or '(Ray defaults: period 3000 ms, timeout 10000 ms, threshold 5)'}")
    cluster = LocalRayCluster(health_check=detection, base_dir=base / "ray")
    pb: ClusterProcess | None = None
    traffic: Traffic | None = None
    losses: list[Loss] = []
    problems: list[str] = []
    try:
        cluster.add_node(num_cpus=1, resources={"head_node": 1})
        for _ in range(args.workers):
            cluster.add_node(num_cpus=1, resources={"worker_node": 1})
        log(f"ray: {len(cluster.nodes)} nodes at {cluster.address}")
        config = write_config(base / "config", args.shards)
        refusal = refused_beside_another_serve_app(cluster, config, base)
        log("beside another job's Serve application, run_cluster.py refused to start, naming it" if refusal is None
            else f"FAIL beside another Serve application: {refusal}")
        if refusal is not None:
            problems.append(refusal)
        pb = ClusterProcess(config, port=free_port(), redis_dir=base / "redis",
                            shards=args.shards, env=DRIVER_ENV, cwd=ROOT, python=sys.executable,
                            address=cluster.address).start()
        log(f"playbus at {pb.url}; shards per node {sorted(shards_on(pb.url).values(), reverse=True)}")
        traffic = Traffic(pb.url, producers=args.producers, users=20, chunk=20)
        thread = traffic.start()
        end = time.monotonic() + args.minutes * 60
        kinds = ["kill", "freeze"]
        rng.shuffle(kinds)
        while time.monotonic() + args.every < end:
            time.sleep(args.every)
            placed = shards_on(pb.url)
            victims = [n for n in cluster.nodes[1:] if placed.get(n.node_id) and n.proc.poll() is None]
            if not victims:
                log("no worker node hosts a shard any more (Ray does not move running actors onto new nodes): "
                    "traffic goes on without losses")
                continue
            node = rng.choice(victims)
            loss = Loss(kinds[len(losses) % 2], node.name, placed[node.node_id], 0.0)
            log(f"LOSS {len(losses) + 1}: {loss.kind} node {node.name} ({loss.shards} shards), "
                f"{traffic.events} events so far")
            lose(cluster, node, loss.kind, pb.url, loss)
            losses.append(loss)
            log(f"  declared dead after {fmt(loss.detected_s)} s, /healthz green after {fmt(loss.green_s)} s; "
                "starting a new worker node")
            add_worker(cluster)
        traffic.stop.set()
        thread.join(300)
        if thread.is_alive():
            problems.append("a producer never got its chunk answered")
        for i, loss in enumerate(losses):
            until = losses[i + 1].at if i + 1 < len(losses) else float("inf")
            loss.longest_wait_s = max((c.done - max(c.first_sent, loss.at) for c in traffic.chunks
                                       if loss.at < c.done < until), default=0.0)
            if loss.green_s is None:
                problems.append(f"loss {i + 1} ({loss.kind} {loss.node}): not taken over in {TAKEOVER_TIMEOUT_S} s")
        log(f"checking {traffic.events} events against the model ...")
        problems += traffic.check(pb.url, pb.redis_url)
    except Exception as e:  # noqa: BLE001 - reported as a failure with what was seen so far
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        if traffic is not None:
            traffic.stop.set()
        if pb is not None:
            rep = pb.stop()
            if not rep.ok:
                problems.append(f"run_cluster.py did not stop cleanly: {rep.as_dict()}")
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                (Path(args.keep) / "cluster.log").write_text("\n".join(pb.lines), encoding="utf-8")
        cluster.stop()
        if args.keep:
            for node_log in (base / "ray").glob("*.log"):
                shutil.copy(node_log, Path(args.keep) / node_log.name)
        shutil.rmtree(base, ignore_errors=True)

    print("\n| loss | kind | node | shards on it | declared dead (s) | /healthz green (s) | longest chunk wait (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, loss in enumerate(losses, 1):
        print(f"| {i} | {loss.kind} | {loss.node} | {loss.shards} | {fmt(loss.detected_s)} | {fmt(loss.green_s)} | "
              f"{fmt(loss.longest_wait_s)} |")
    events = traffic.events if traffic is not None else 0
    print(f"\n{events} events, {len(losses)} node losses, detection {args.detection}, seed {args.seed}")
    for problem in problems:
        print(f"FAIL: {problem}")
    print("PASS" if not problems and losses else "FAIL" if problems else "FAIL: no node was lost")
    return 0 if not problems and losses else 1


if __name__ == "__main__":
    sys.exit(main())
