"""Processes a fault test starts and kills: only its own, found by descent, never by name alone.

Every Ray process a test's cluster runs (GCS, raylet, workers, actors) descends from the process
that started that cluster, so killing "the sampling actor" means: a descendant of this test
(or of the CLI it started) whose title names the actor class. Other Ray clusters on the host
(other people's tests) are never touched; nothing here runs `ray stop`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

OODSCALE = str(Path(sys.executable).parent / "oodscale")


def descendants(pid: int | None = None) -> list[psutil.Process]:
    try:
        return psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def titled(fragment: str, pid: int | None = None) -> list[psutil.Process]:
    """Descendants of `pid` (default: this process) whose name or title contains `fragment`
    (Ray titles its workers `ray::<ActorClass>...`)."""
    found = []
    for proc in descendants(pid):
        try:
            if fragment in proc.name() or fragment in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def wait_for(check: Callable[[], Any], what: str, limit_s: float = 240.0) -> Any:
    """Poll `check` until it returns something truthy; the limit only guards against a hang."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    """`oodscale ARGS` in its own session (so its process group is its alone), with its own
    local Ray (RAY_ADDRESS removed), output to `log`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("wb") as out:
        return subprocess.Popen([OODSCALE, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a CLI started by `start_cli` and every process under it (its Ray included);
    returns the pids killed."""
    tree = [proc.pid, *(p.pid for p in descendants(proc.pid))]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything forked since, in its own group
    except ProcessLookupError:
        pass
    proc.wait()
    wait_for(lambda: not any(psutil.pid_exists(p) and _alive(p) for p in tree),
             "the killed processes to exit", 60)
    return tree


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
