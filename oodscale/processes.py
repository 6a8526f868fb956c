"""Stopping a process together with the helpers it started, so none outlives it."""

from __future__ import annotations

import psutil


def stop_processes(procs: list[psutil.Process], grace_s: float = 10.0) -> None:
    """SIGTERM every process in `procs`, then SIGKILL those still up after `grace_s`; returns
    once all have exited (children of this process are reaped)."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
