"""Ray Train worker groups as `run_trainer` starts them: the controller's poll interval, which
every start, checkpoint report and end of a group waits for, reaches the group."""

from __future__ import annotations

from pathlib import Path

import pytest

from oodscale.config import load_config
from oodscale.distributed import HEALTH_CHECK_ENV, run_trainer
from oodscale.runtime import layout_for
from tests.support import DIGITS


def _write_poll_interval(config: dict) -> None:
    """The worker's view of the interval, into a file (a report without a checkpoint leaves
    the result's metrics empty)."""
    import os

    Path(config["out"]).write_text(os.environ.get(HEALTH_CHECK_ENV, "unset"))


@pytest.mark.integration
def test_worker_groups_poll_every_half_second_unless_the_environment_says(ray_cluster, tmp_path,
                                                                          monkeypatch):
    cfg = load_config(DIGITS, [f"storage.root={tmp_path}", "train.num_workers=1"])
    out = tmp_path / "interval"
    monkeypatch.delenv(HEALTH_CHECK_ENV, raising=False)
    run_trainer(_write_poll_interval, {"out": str(out)}, {}, cfg.train, layout_for(cfg), "poll")
    assert out.read_text() == "0.5"  # Ray's default, 2 s, cost ~3 s per group
    monkeypatch.setenv(HEALTH_CHECK_ENV, "1.5")
    run_trainer(_write_poll_interval, {"out": str(out)}, {}, cfg.train, layout_for(cfg),
                "poll-set")
    assert out.read_text() == "1.5"
