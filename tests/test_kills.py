"""Real kills: SIGKILL a sampling actor, a Ray Train worker, the driver, the whole local Ray,
mid-stage, and check what the run (or its rerun) produced against a clean run.

The session fixture `tiny_reference` runs the tiny experiment once, uninterrupted.
Each test copies the finished inputs of the stage it interrupts into a fresh root, kills
something mid-stage, and compares. Killed processes are found by descent from this test or from
the CLI it started (tests/procs.py): other Ray clusters on the host are never touched.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from oodscale.cli import main
from tests.faults import (
    NUM_SHARDS,
    RUN,
    args,
    card,
    checkpointed,
    copy,
    listed,
    same_weights,
    shard_bytes,
    synthetic,
)
from tests.procs import kill_tree, start_cli, titled, wait_for

pytestmark = pytest.mark.integration


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def _in_thread(argv: list[str]) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rc=main(argv)))
    thread.start()
    return thread, result


def test_killed_sampling_actor_is_replaced_and_shards_equal_a_clean_run(tiny_reference,
                                                                        tmp_path):
    root = copy(tiny_reference, tmp_path, ["data", "diffusion"])
    thread, result = _in_thread(["generate", *args(root)])
    victims = wait_for(lambda: 1 <= len(listed(root)) < NUM_SHARDS and titled("ShardSampler"),
                       "a sampling actor mid-run")
    listed_at_kill = len(listed(root))
    victims[0].kill()
    thread.join()
    assert result["rc"] == 0
    assert listed_at_kill < NUM_SHARDS  # the kill came while shards were being drawn
    assert len(listed(root)) == NUM_SHARDS  # each shard listed once
    assert shard_bytes(root) == shard_bytes(tiny_reference)


def test_killed_driver_mid_generate_rerun_draws_only_the_missing_shards(tiny_reference,
                                                                         tmp_path, capsys):
    root = copy(tiny_reference, tmp_path, ["data", "diffusion"])
    cli = start_cli(["generate", *args(root), "ray.num_cpus=4"], tmp_path / "killed.log")
    wait_for(lambda: 1 <= len(listed(root)) < NUM_SHARDS, "the first synthetic shards")
    kill_tree(cli)  # the driver and the local Ray it started
    survivors = {s["path"]: (synthetic(root) / s["path"]).stat() for s in listed(root)}
    assert 1 <= len(survivors) < NUM_SHARDS
    assert main(["generate", *args(root)]) == 0
    assert "taking over the stale lock" in capsys.readouterr().out  # the dead driver's lock
    for name, before in survivors.items():  # finished shards were kept, not drawn again
        after = (synthetic(root) / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert shard_bytes(root) == shard_bytes(tiny_reference)


def test_generate_redraws_a_damaged_listed_shard(tiny_reference, tmp_path, capsys):
    root = copy(tiny_reference, tmp_path, ["data", "diffusion", "synthetic*"])
    shard = synthetic(root) / listed(root)[2]["path"]
    shard.write_bytes(shard.read_bytes()[:-1024])  # truncated after its manifest entry
    untouched = (synthetic(root) / listed(root)[0]["path"]).stat().st_mtime_ns
    assert main(["generate", *args(root)]) == 0
    assert f"redrawing: shard {shard} is corrupt (size" in capsys.readouterr().out
    assert (synthetic(root) / listed(root)[0]["path"]).stat().st_mtime_ns == untouched
    assert shard_bytes(root) == shard_bytes(tiny_reference)


def test_killed_diffusion_worker_resumes_weights_ema_and_lr_schedule(tiny_reference, tmp_path):
    """A DDPM worker killed after its first checkpoint: the restarted group resumes from it,
    and the published (EMA) weights equal an uninterrupted run's bit for bit, so the EMA, the
    optimiser and the lr schedule all survived the restart."""
    longer = ["diffusion.epochs=12"]  # a checkpoint every 3 epochs
    clean = copy(tiny_reference, tmp_path / "clean", ["data"])
    assert main(["train-diffusion", *args(clean), *longer]) == 0
    root = copy(tiny_reference, tmp_path / "killed", ["data"])
    started = time.time()
    thread, result = _in_thread(["train-diffusion", *args(root), *longer])
    wait_for(lambda: checkpointed(root, "diffusion"), "the first DDPM checkpoint")
    workers = [w for w in titled("RayTrainWorker") if w.create_time() >= started - 1]
    assert workers, "no Ray Train worker found"
    assert not (root / "digits" / "diffusion" / "model.json").exists()  # mid-training
    workers[0].kill()
    thread.join()
    assert result["rc"] == 0
    resumed, uninterrupted = (json.loads((r / "digits" / "diffusion" / "model.json")
                                         .read_text()) for r in (root, clean))
    assert resumed["first_epoch"] >= 1 and uninterrupted["first_epoch"] == 0
    assert resumed["ema_steps"] == uninterrupted["ema_steps"] == resumed["steps"]
    assert resumed["model_hash"] == uninterrupted["model_hash"]
    assert resumed["final_loss"] == uninterrupted["final_loss"]
    unet = Path("digits", "diffusion", "unet")
    assert _tree(root / unet) == _tree(clean / unet)  # the published EMA weights, bit for bit


def test_killed_train_worker_restarts_from_its_last_checkpoint(tiny_reference, tmp_path):
    root = copy(tiny_reference, tmp_path, ["data", "diffusion", "synthetic*"])
    started = time.time()
    thread, result = _in_thread(["train", *args(root)])
    wait_for(lambda: checkpointed(root), "the first training checkpoint")
    # this trainer's workers (not an earlier group's, which may still be exiting)
    workers = [w for w in titled("RayTrainWorker") if w.create_time() >= started - 1]
    assert workers, "no Ray Train worker found"
    assert not (root / "digits" / "classifiers" / RUN).exists()  # mid-training
    workers[0].kill()
    thread.join()
    assert result["rc"] == 0
    trained = card(root)
    assert trained["epoch"] == 2 and trained["train"]["first_epoch"] >= 1  # resumed
    assert same_weights(root, tiny_reference)  # and equal to the uninterrupted classifier


def test_whole_run_killed_mid_train_resumes_every_stage(tiny_reference, tmp_path):
    """The driver and its whole local Ray die in the train stage; `run` again resumes: data
    and DDPM kept, generation finished (bit-exact), training from its checkpoint."""
    root = copy(tiny_reference, tmp_path, ["data", "diffusion"])
    cli = start_cli(["run", *args(root), "ray.num_cpus=4"], tmp_path / "killed.log")
    wait_for(lambda: checkpointed(root), "the killed run's first training checkpoint", 900)
    kill_tree(cli)
    assert not (root / "digits" / "classifiers" / RUN / "classifier.json").exists()
    assert main(["run", *args(root)]) == 0
    for stage in ("data", "diffusion"):  # finished before the kill: kept as they were
        assert _tree(root / "digits" / stage) == _tree(tiny_reference / "digits" / stage)
    assert shard_bytes(root) == shard_bytes(tiny_reference)  # drawn by the killed run
    trained = card(root)
    assert trained["train"]["first_epoch"] >= 1 and trained["epoch"] == 2  # resumed
    assert same_weights(root, tiny_reference)
    results, clean = (pd.read_parquet(r / "digits" / "eval" / "results.parquet")
                      for r in (root, tiny_reference))
    assert set(results["run"]) == {RUN}
    pd.testing.assert_frame_equal(results, clean)  # every stage bit-exact, training included
