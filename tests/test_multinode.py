"""Many nodes on one machine: a three-node Ray (`ray.cluster_utils.Cluster`, fractional CPUs)
runs generate and train with their actors and workers on different nodes, and loses a worker
node mid-stage. Each run is a separate process (tests/multinode_run.py): a process joins one
Ray, and this session's is already up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults import NUM_SHARDS, TINY, card, copy, listed, shard_bytes
from tests.support import REPO

pytestmark = pytest.mark.integration


def _run_on_three_nodes(reference: Path, tmp_path: Path, stage: str, parts: list[str],
                        extra: list[str]) -> tuple[Path, dict]:
    root = copy(reference, tmp_path, parts)
    report = tmp_path / "report.json"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "PYTHONPATH": str(REPO)}  # the driver imports tests.support, tests.faults
    done = subprocess.run([sys.executable, str(REPO / "tests" / "multinode_run.py"), str(root),
                           stage, str(report), *TINY, *extra], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return root, {**json.loads(report.read_text()), "output": (done.stdout + done.stderr)[-4000:]}


def test_generate_loses_a_worker_node_and_finishes(tiny_reference, tmp_path):
    # 2 of a node's 3 CPUs per actor: two actors can never share a node
    root, report = _run_on_three_nodes(tiny_reference, tmp_path, "generate",
                                       ["data", "diffusion"], ["generate.cpus_per_actor=2"])
    assert report["nodes"] == 3
    assert len(set(report["placed"].values())) >= 2  # actors on different nodes
    assert report["removed"] is not None and report["listed_at_removal"] < NUM_SHARDS
    assert report["rc"] == 0, report["output"]
    assert len(listed(root)) == NUM_SHARDS  # nothing lost, nothing listed twice
    assert shard_bytes(root) == shard_bytes(tiny_reference)


def test_train_loses_a_worker_node_and_resumes_on_the_rest(tiny_reference, tmp_path):
    root, report = _run_on_three_nodes(tiny_reference, tmp_path, "train",
                                       ["data", "diffusion", "synthetic*"],
                                       ["train.cpus_per_worker=2", "train.num_workers=2"])
    assert report["nodes"] == 3
    assert len(set(report["placed"].values())) >= 2  # the two workers on different nodes
    assert report["removed"] is not None and not report["published_at_removal"]
    assert report["rc"] == 0, report["output"]
    trained = card(root)
    assert trained["epoch"] == 2 and trained["train"]["first_epoch"] >= 1
