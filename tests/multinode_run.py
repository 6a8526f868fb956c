"""Driver for tests/test_multinode.py, run in its own process (a process joins one Ray only).

    python tests/multinode_run.py ROOT STAGE REPORT.json [overrides...]

Starts a three-node Ray on this machine (`ray.cluster_utils.Cluster`: a head and two worker
nodes, fractional CPUs), runs one oodscale stage on it, and while it runs removes the worker
node that hosts one of the stage's actors (generate) or Train workers (train) once the stage is
under way. Writes which node each of those processes ran on and what was removed to REPORT.
Every process it starts descends from it; the cluster is shut down at the end.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import psutil

from tests.support import CONFIG

ROLE = {"generate": "ShardSampler", "train": "RayTrainWorker"}


def _raylets(cluster) -> dict[int, object]:
    nodes = [cluster.head_node, *cluster.worker_nodes]
    return {n.all_processes["raylet"][0].process.pid: n for n in nodes}


def _node_of(proc: psutil.Process, raylets: dict[int, object]) -> int | None:
    """The raylet pid a worker process runs under (Ray forks workers from their raylet)."""
    for parent in proc.parents():
        if parent.pid in raylets:
            return parent.pid
    return None


def _listed(root: Path) -> list:
    found = list((root / "digits").glob("synthetic*/manifest.json"))
    try:
        return json.loads(found[0].read_text())["shards"] if found else []
    except (ValueError, FileNotFoundError):  # mid-rename
        return []


def _started(root: Path, stage: str) -> bool:
    """The stage is under way: a shard listed, or a first training checkpoint written."""
    if stage == "generate":
        return bool(_listed(root))
    from tests.faults import checkpointed

    return checkpointed(root)


def main() -> None:
    root, stage, report_path, *overrides = sys.argv[1:]
    import ray
    from ray.cluster_utils import Cluster

    from oodscale.cli import main as oodscale

    node_args = {"num_cpus": 3, "object_store_memory": 120 * 2**20}
    # Ray Train's helper actors call ray.init() without an address; with the test session's own
    # Ray also on this host that is ambiguous, so every process started here inherits this one.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True,
                      head_node_args={**node_args, "include_dashboard": False,
                                      "gcs_server_port": port})
    for _ in range(2):
        cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    report: dict = {"nodes": len(ray.nodes()), "placed": {}, "removed": None}
    raylets = _raylets(cluster)
    me = psutil.Process()

    def remove_one() -> None:
        while report["removed"] is None:
            placed = {}
            for proc in me.children(recursive=True):
                try:
                    if ROLE[stage] in " ".join(proc.cmdline()):
                        placed[proc.pid] = _node_of(proc, raylets)
                except psutil.NoSuchProcess:
                    continue
            report["placed"].update({str(k): v for k, v in placed.items()})
            on_workers = [n for n in placed.values() if n != _head_raylet(cluster)]
            if _started(Path(root), stage) and len(set(placed.values())) >= 2 and on_workers:
                report["listed_at_removal"] = len(_listed(Path(root)))
                report["published_at_removal"] = any(
                    (Path(root) / "digits" / "classifiers").glob("*/classifier.json"))
                cluster.remove_node(raylets[on_workers[0]])
                report["removed"] = on_workers[0]
            time.sleep(0.2)

    watcher = threading.Thread(target=remove_one, daemon=True)
    watcher.start()
    report["rc"] = oodscale([stage, CONFIG, f"storage.root={root}", *overrides])
    Path(report_path).write_text(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


def _head_raylet(cluster) -> int:
    return cluster.head_node.all_processes["raylet"][0].process.pid


if __name__ == "__main__":
    main()
