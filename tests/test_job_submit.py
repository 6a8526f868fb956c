"""End to end: a real Ray head on loopback, `ray job submit` of prepare and generate."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from oodscale.data.shards import read_manifest
from oodscale.processes import stop_processes
from oodscale.runtime import open_storage
from tests.procs import descendants
from tests.support import NO_QUALITY, REPO

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
TINY = ["data.ood_sets=[openset,gaussian]", "data.ood_samples=16",
        "generate.num_shards=2", "generate.samples_per_shard=4", "generate.steps=2",
        "generate.concurrency=1", "generate.grid_per_class=1", *NO_QUALITY]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in a child process; terminating it stops what it started.

    The GCS port is picked free up front (rather than --port=0) so drivers can be pointed at it.
    """
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed next to this Python")
    dash, gcs_port = _free_port(), _free_port()
    # Every agent port gets a free one, so this head can live beside the session's local Ray.
    agent_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    temp_dir = Path("/tmp") / f"oe2e{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    # A fresh machine has no token yet: create one (kept out of the test output).
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env,
                   capture_output=True, check=True)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=4",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--include-dashboard=true",
         "--object-store-memory=200000000", f"--temp-dir={temp_dir}", *agent_ports],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited: {head.stdout.read()}")
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                               env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        head.terminate()
        pytest.fail("the Ray head's job server did not come up within 120 s")
    from ray.util import get_node_ip_address

    yield address, env, f"{get_node_ip_address()}:{gcs_port}"
    _stop_head(head)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(head: subprocess.Popen) -> None:
    """Stop the head and every process it started, killing what is still up after 10 s (its
    graceful stop waits ~30 s on processes this throwaway head does not need)."""
    import psutil

    stop_processes([psutil.Process(head.pid), *descendants(head.pid)])
    head.wait(timeout=30)


def _submit(address: str, env: dict, script: str, args: list[str]) -> str:
    runtime_env = json.dumps({"excludes": [".venv", "runs", ".git", "*.egg-info"]})
    for _ in range(20):  # the head's job agent comes up a little after its HTTP server
        job_id = f"oodscale-{script.split('.')[0]}-{uuid.uuid4().hex[:6]}"
        done = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
             "--working-dir", str(REPO), "--runtime-env-json", runtime_env, "--",
             sys.executable, f"jobs/{script}", "--config", "configs/digits.yaml", *args],
            env=env, capture_output=True, text=True, timeout=540)
        if "No available agent" not in done.stderr:
            break
        time.sleep(2)
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job_id],
                            env=env, capture_output=True, text=True)
    assert "succeeded" in status.stdout.lower(), done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0
    return done.stdout


def _untrained_ddpm(root: Path) -> None:
    """A tiny saved DDPM so the generate job has a model to load (training is tested elsewhere)."""
    from oodscale.diffusion.generators import content_hash
    from oodscale.diffusion.model import LabelConditionedUNet

    unet_dir = root / "digits" / "diffusion" / "unet"
    LabelConditionedUNet(6, 16, 1, (8, 8), 1).save_pretrained(unet_dir)
    card = {"num_classes": 6, "class_names": [str(i) for i in range(6)], "image_size": 16,
            "channels": 1, "timesteps": 1000, "model_hash": content_hash(unet_dir),
            "final_loss": None, "epochs": 0}
    (root / "digits" / "diffusion" / "model.json").write_text(json.dumps(card))


def test_prepare_and_generate_via_ray_job_submit(ray_head, tmp_path):
    address, env, _ = ray_head
    root = tmp_path / "runs"
    args = [f"storage.root={root}", *TINY]
    out = _submit(address, env, "prepare.py", args)
    assert "prepare done" in out
    storage = open_storage(str(root))
    assert read_manifest(storage, storage.path("digits", "data", "id", "train")).num_samples > 0
    assert read_manifest(storage, storage.path("digits", "data", "ood", "openset")).kind == "ood"

    _untrained_ddpm(root)
    out = _submit(address, env, "generate.py", args)
    assert "generate done" in out
    syn = read_manifest(storage, storage.path("digits", "synthetic-w3"))
    assert syn.num_samples == 8 and len(syn.shards) == 2
    assert (root / "digits" / "synthetic-w3" / "grid.png").is_file()


def _run_job(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"jobs/{script}", "--config", "configs/digits.yaml",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_job_joins_a_running_cluster(ray_head, tmp_path, how):
    """The same entry point joins a running cluster instead of starting its own Ray."""
    _, env, gcs = ray_head
    root = tmp_path / "runs"
    args = [f"storage.root={root}", *TINY]
    if how == "--address":
        done = _run_job("prepare.py", ["--address", gcs, *args], env)
    else:
        done = _run_job("prepare.py", args, {**env, "RAY_ADDRESS": gcs})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"joined the Ray cluster at {gcs}" in done.stdout
    assert "prepare done" in done.stdout
    assert (root / "digits" / "data" / "id" / "train" / "manifest.json").is_file()
