"""The local Ray a job starts listens on loopback alone (`ray.host`, default 127.0.0.1), and a
non-loopback address is refused while Ray's token auth is off (`pytest -k loopback`)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import psutil
import pytest

from oodscale.config import load_config
from oodscale.runtime import init_ray, is_loopback
from tests.procs import descendants
from tests.support import CONFIG

# A job's own Ray, started by oodscale.runtime.init_ray in a child process, held until stdin
# closes; the child prints its pid once Ray is up.
START = f"""
import os, sys, ray
from oodscale.config import load_config
from oodscale.runtime import init_ray
init_ray(load_config({CONFIG!r}, sys.argv[1:]))
print("pid", os.getpid(), flush=True)
sys.stdin.read()
ray.shutdown()
"""


def _listening(pid: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket of `pid` and its descendants."""
    found = set()
    for proc in [psutil.Process(pid), *descendants(pid)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((proc.name(), conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def _loopback_address(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def test_local_ray_listens_on_loopback_only():
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", START, "ray.num_cpus=1",
                             "ray.object_store_mb=80"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = iter(proc.stdout.readline, "")
        assert next(line for line in lines if line.startswith("pid ")).split()[1] == str(proc.pid)
        sockets = _listening(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the check saw Ray's own servers
    wide = sorted(s for s in sockets if not _loopback_address(s[1]))
    assert not wide, f"listening beyond loopback: {wide}"


def test_non_loopback_host_refused_without_token_auth_loopback(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    started = ray.is_initialized()  # the session's Ray, or none: refusing comes first either way
    with pytest.raises(ValueError, match="RAY_AUTH_MODE=disabled"):
        init_ray(load_config(CONFIG, ["ray.host=0.0.0.0"]))
    assert ray.is_initialized() == started  # no Ray was started


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("head.example")
