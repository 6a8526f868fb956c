"""stop_processes: every process stops, one that ignores SIGTERM is killed after the grace."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

from oodscale.processes import stop_processes

IGNORES_TERM = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(120)")


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace():
    stubborn = subprocess.Popen([sys.executable, "-c", IGNORES_TERM], stdout=subprocess.PIPE,
                                text=True)
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    assert stubborn.stdout.readline().strip() == "ready"  # its SIGTERM handler is set
    started = time.monotonic()
    procs = [psutil.Process(stubborn.pid), psutil.Process(plain.pid)]
    stop_processes(procs, grace_s=1.0)
    assert time.monotonic() - started < 30
    assert not any(psutil.pid_exists(p.pid) for p in procs)  # exited and reaped
    assert [p.returncode for p in procs] == [-signal.SIGKILL, -signal.SIGTERM]
