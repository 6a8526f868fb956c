"""Stage bars: plain lines when not on a terminal, and worker epochs reaching the driver."""

from __future__ import annotations

import pytest

from oodscale import progress
from tests.procs import wait_for


def test_bar_in_a_log_prints_lines_not_carriage_returns(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    items = list(progress.track(range(3), "generate", 3, "shard"))
    err = capsys.readouterr().err
    assert items == [0, 1, 2]
    assert "\r" not in err
    assert err.splitlines() == [f"[oodscale] generate: {n}/3 shards" for n in (1, 2, 3)]


def test_bar_in_a_log_stays_quiet_between_intervals(capsys):
    bar = progress.StageBar("train", 100, "epoch")
    for n in range(1, 101):
        bar.advance_to(n, f"loss {1 / n:.3f}")
    bar.close()
    assert bar.n == 100 and bar.status == "loss 0.010"
    assert capsys.readouterr().err == ""  # far less than LOG_EVERY_S passed


def test_bar_in_a_log_prints_at_most_ten_lines_however_slow(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # as if every update came a minute late
    bar = progress.StageBar("train-diffusion", 100, "epoch")
    for n in range(1, 101):
        bar.advance_to(n, "loss 0.1")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10
    assert lines[-1] == "[oodscale] train-diffusion: 100/100 epochs  loss 0.1"


@pytest.mark.integration
def test_worker_epochs_reach_the_driver_in_order(ray_cluster):
    ray = ray_cluster

    @ray.remote(num_cpus=0.25)
    def worker(label: str, epochs: int) -> None:
        for epoch in range(epochs):
            progress.publish(label, {"epoch": epoch, "loss": 1.0 / (epoch + 1)})

    seen: list[dict] = []
    with progress.epoch_progress("train", 5, seen.append):
        ray.get([worker.remote("a", 3), worker.remote("b", 2)])
    assert [i["epoch"] for i in seen if i["label"] == "a"] == [0, 1, 2]
    assert [i["loss"] for i in seen if i["label"] == "b"] == [1.0, 0.5]
    ray.get(worker.remote("late", 1))  # no stage open: nothing to publish to, no error


@pytest.mark.integration
def test_a_lost_mailbox_costs_the_display_not_the_stage(ray_cluster, capsys):
    # a mailbox on a node that dies mid-stage used to fail a stage whose training had finished
    ray = ray_cluster
    with progress.epoch_progress("train", 2):
        mailbox = ray.get_actor(progress.MAILBOX)
        owner = ray.get(mailbox.__ray_call__.remote(
            lambda _: ray.get_runtime_context().get_node_id()))
        ray.kill(mailbox)  # asynchronous: wait until calls to it fail
        wait_for(lambda: _dead(ray, mailbox), "the killed mailbox to refuse calls", 60)
    assert owner == ray.get_runtime_context().get_node_id()  # placed beside the driver
    assert "train: progress display lost (ActorDiedError); the stage goes on" in (
        capsys.readouterr().err)


def _dead(ray, actor) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=5)
    except ray.exceptions.RayActorError:
        return True
    return False
