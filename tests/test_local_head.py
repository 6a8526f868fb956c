"""cluster/stop-local-head.sh stops the head cluster/start-local-head.sh started, and only it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.procs import wait_for
from tests.support import REPO

pytestmark = pytest.mark.integration
CLUSTER = REPO / "cluster"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -ww" not in line]


@pytest.fixture
def ray_temp_dir():
    """Short: Ray's socket paths under it must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="oh", dir="/tmp"))
    yield path
    for line in _running(str(path)):  # whatever a failed test left of its own head
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def test_stop_script_stops_its_head_and_leaves_other_rays(ray_temp_dir, ray_cluster):
    env = {**os.environ, "RAY_BIN": str(Path(sys.executable).parent / "ray"),
           "RAY_TEMP_DIR": str(ray_temp_dir), "DASHBOARD_PORT": str(_free_port())}
    env.pop("RAY_ADDRESS", None)
    # every agent port a free one, so this head lives beside the session's Ray
    ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    started = subprocess.run([str(CLUSTER / "start-local-head.sh"), "--num-cpus=1", *ports],
                             env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    pidfile = re.search(r"stop-local-head\.sh (\S+\.pids)", started.stdout).group(1)
    session, address = Path(pidfile).read_text().split("\n", 1)[0].split()
    assert _running(session)
    stopped = subprocess.run([str(CLUSTER / "stop-local-head.sh"), pidfile], env=env,
                             capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped the Ray head at {address}" in stopped.stdout
    wait_for(lambda: not _running(session), "the head's processes to exit", 60)
    # the test session's own Ray, started before, still runs
    assert ray_cluster.get(ray_cluster.remote(lambda: 42).remote()) == 42
