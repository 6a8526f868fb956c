"""One writer per experiment root: a live holder refuses, a dead or silent one is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from oodscale.cli import main
from oodscale.locking import LOCK, STALE_AFTER_S, LockedError, experiment_lock, me
from oodscale.runtime import RunLayout, open_storage
from tests.support import CONFIG


def _layout(tmp_path: Path) -> RunLayout:
    return RunLayout(open_storage(str(tmp_path)), "digits")


def _plant(tmp_path: Path, **changes) -> Path:
    """A lock file as another holder would have left it."""
    lock = tmp_path / "digits" / LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps(asdict(replace(me("train"), **changes))))
    return lock


@pytest.fixture
def holder_process(tmp_path):
    """A second process holding the experiment's lock, as a concurrent run would."""
    code = ("import sys, time\n"
            "from oodscale.locking import experiment_lock\n"
            "from oodscale.runtime import RunLayout, open_storage\n"
            f"with experiment_lock(RunLayout(open_storage({str(tmp_path)!r}), 'digits'), "
            "'generate'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_second_run_is_refused_naming_the_holder(tmp_path, holder_process, capsys):
    assert main(["prepare", CONFIG, f"storage.root={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert f"pid {holder_process.pid}" in err and "oodscale generate" in err
    assert "one run per experiment root" in err
    assert not (tmp_path / "digits" / "data").exists()  # refused before writing anything
    # read-only commands take no lock
    assert main(["verify", CONFIG, f"storage.root={tmp_path}"]) == 1
    assert "is being written" not in capsys.readouterr().err


def test_lock_of_a_killed_run_is_taken_over(tmp_path, holder_process, capsys):
    holder_process.kill()
    holder_process.wait()
    with experiment_lock(_layout(tmp_path), "train") as held:
        on_disk = json.loads((tmp_path / "digits" / LOCK).read_text())
        assert on_disk["pid"] == os.getpid() == held.pid
    assert f"stale lock of `oodscale generate`, pid {holder_process.pid}" in capsys.readouterr().out
    assert not (tmp_path / "digits" / LOCK).exists()  # released


def test_reused_pid_is_not_the_holder(tmp_path):
    _plant(tmp_path)  # this very process, alive: held
    with pytest.raises(LockedError, match=f"pid {os.getpid()} on host"):
        with experiment_lock(_layout(tmp_path), "train"):
            pass
    lock = _plant(tmp_path, pid_started=time.time() - 3600)  # same pid, an earlier process
    with experiment_lock(_layout(tmp_path), "train") as held:
        assert json.loads(lock.read_text())["pid_started"] == held.pid_started


def test_other_host_is_held_while_its_heartbeat_is_fresh(tmp_path):
    _plant(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(LockedError, match="pid 1 on host elsewhere"):
        with experiment_lock(_layout(tmp_path), "train"):
            pass
    _plant(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - STALE_AFTER_S - 1)
    with experiment_lock(_layout(tmp_path), "train") as held:
        assert held.host != "elsewhere"


def test_unreadable_lock_is_taken_over(tmp_path):
    lock = _plant(tmp_path)
    lock.write_text("{half")
    with experiment_lock(_layout(tmp_path), "train"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
