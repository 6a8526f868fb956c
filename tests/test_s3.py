"""The storage root on a real S3-compatible server (moto's, started by the `s3_server` fixture
on loopback): publishing without directory moves, a publish killed midway, the lock."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from oodscale.classify.cards import CARD, WEIGHTS, trained_runs
from oodscale.distributed import publish_dir
from oodscale.runtime import open_storage
from tests.support import REPO


def _model_dir(path: Path, version: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / WEIGHTS).write_bytes(version.encode() * 1000)
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "extra.bin").write_bytes(version.encode())
    (path / CARD).write_text(f'{{"version": "{version}"}}')
    return path


def _files(storage, directory: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    infos = storage.fs.get_file_info(pafs.FileSelector(directory, recursive=True))
    return {i.path[len(directory) + 1:]: storage.read_bytes(i.path) for i in infos
            if i.type == pafs.FileType.File}


def test_s3_publish_writes_final_names_card_last(s3_server, tmp_path):
    storage = open_storage(s3_server("publish"))
    destination = storage.path("digits", "classifiers", "run")
    publish_dir(storage, str(_model_dir(tmp_path / "v1", "one")), destination, last=(CARD,))
    assert _files(storage, destination) == {WEIGHTS: b"one" * 1000, "sub/extra.bin": b"one",
                                            CARD: b'{"version": "one"}'}
    # a second publish replaces the first whole, leaving no file of it behind
    source = _model_dir(tmp_path / "v2", "two")
    (source / "sub" / "extra.bin").unlink()
    publish_dir(storage, str(source), destination, last=(CARD,))
    assert _files(storage, destination) == {WEIGHTS: b"two" * 1000, CARD: b'{"version": "two"}'}


def test_no_directory_move_remains():
    """pyarrow's S3 and GCS filesystems cannot move a directory: nothing in oodscale tries."""
    root = REPO / "oodscale"
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ".move(" in line:
                assert "# moves a file" in line, f"{path}:{number} moves a path: {line.strip()}"


KILLED_PUBLISH = """
import sys, time
import pyarrow.fs as pafs
from oodscale.distributed import publish_dir
from oodscale.runtime import open_storage
copy = pafs.copy_files
def slow_copy(source, destination, **kwargs):
    copy(source, destination, **kwargs)
    print("copied", destination, flush=True)
    time.sleep(120)  # killed here, after the first file
pafs.copy_files = slow_copy
publish_dir(open_storage(sys.argv[1]), sys.argv[2], sys.argv[3], last=("classifier.json",))
"""


def test_s3_publish_killed_midway_leaves_no_finished_model(s3_server, tmp_path):
    root = s3_server("killed")
    storage = open_storage(root)
    destination = storage.path("digits", "classifiers", "run")
    publish_dir(storage, str(_model_dir(tmp_path / "v1", "one")), destination, last=(CARD,))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISH, root,
                             str(_model_dir(tmp_path / "v2", "two")), destination],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("copied")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    files = _files(storage, destination)
    assert CARD not in files and files  # the card went first, some new files are there
    assert trained_runs(storage, storage.path("digits", "classifiers")) == []  # readers' view
    publish_dir(storage, str(tmp_path / "v2"), destination, last=(CARD,))  # the rerun
    assert _files(storage, destination)[CARD] == b'{"version": "two"}'
    assert trained_runs(storage, storage.path("digits", "classifiers")) == ["run"]


def _lock_layout(root: str):
    from oodscale.runtime import RunLayout

    return RunLayout(open_storage(root), "digits")


def test_s3_lock_creation_is_exclusive(s3_server):
    """Eight creators at once on the S3 server: one conditional PUT (If-None-Match) wins."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from oodscale.locking import LOCK, S3Lock, lock_at, me

    layout = _lock_layout(s3_server("lock"))
    lock = lock_at(layout.storage, layout.storage.path("digits", LOCK))
    assert isinstance(lock, S3Lock)
    holders = [replace(me("train"), pid=n) for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda h: S3Lock(lock.storage, lock.path).create(h), holders))
    assert won.count(True) == 1
    assert lock.read()[0] == holders[won.index(True)]


def _plant_s3(layout, **changes):
    from dataclasses import asdict, replace

    from oodscale.locking import LOCK, me

    path = layout.storage.path("digits", LOCK)
    with layout.storage.fs.open_output_stream(path) as f:
        f.write(json.dumps(asdict(replace(me("train"), **changes))).encode())


def test_s3_lock_retried_rayjob_takes_over_its_crashed_attempt(s3_server, monkeypatch, capsys):
    """A head pod died holding the lock (another host, heartbeat still fresh): the retry of the
    same RayJob (same OODSCALE_LOCK_OWNER) takes it at once; another RayJob is refused."""
    from oodscale.locking import OWNER_ENV, LockedError, experiment_lock

    layout = _lock_layout(s3_server("retry"))
    _plant_s3(layout, host="oodscale-train-abcde-head", pid=1, owner="rayjob/ns/oodscale-train")
    monkeypatch.setenv(OWNER_ENV, "rayjob/ns/oodscale-calibrate")
    with pytest.raises(LockedError, match="oodscale-train-abcde-head"):
        with experiment_lock(layout, "calibrate"):
            pass
    monkeypatch.setenv(OWNER_ENV, "rayjob/ns/oodscale-train")
    with experiment_lock(layout, "train") as held:
        assert held.owner == "rayjob/ns/oodscale-train"
    assert "an earlier attempt of rayjob/ns/oodscale-train" in capsys.readouterr().out
    assert not layout.storage.exists(layout.storage.path("digits", ".oodscale.lock"))  # released


def test_s3_lock_lost_stops_the_writer(s3_server, monkeypatch):
    """Someone replaces our lock: the next heartbeat's conditional PUT fails, the holder stops
    (its main thread is interrupted, its next manifest/card write refused) and leaves the new
    holder's lock alone."""
    import time

    from oodscale import locking
    from oodscale.locking import LockedError, experiment_lock

    monkeypatch.setattr(locking, "HEARTBEAT_S", 0.2)
    layout = _lock_layout(s3_server("lost"))
    storage = layout.storage
    with pytest.raises(LockedError, match="was taken by .*pid 4242"):
        with experiment_lock(layout, "train"):
            _plant_s3(layout, host="elsewhere", pid=4242)  # an operator deleted ours, or so
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.05)
    assert json.loads(storage.read_bytes(storage.path("digits", locking.LOCK)))["pid"] == 4242


def test_s3_lock_lost_refuses_the_next_write(s3_server, monkeypatch, tmp_path):
    """Between the lost heartbeat and the driver's exit, its next manifest, card or publish is
    refused (the main thread's interrupt is held off here to see that)."""
    import time

    from oodscale import locking
    from oodscale.locking import LockedError, experiment_lock

    monkeypatch.setattr(locking, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(locking._thread, "interrupt_main", lambda: None)
    layout = _lock_layout(s3_server("refused"))
    storage = layout.storage
    with pytest.raises(LockedError, match="while this run held it"):  # not a success either
        with experiment_lock(layout, "train"):
            _plant_s3(layout, host="elsewhere", pid=4242)
            time.sleep(1.0)  # a few heartbeats
            with pytest.raises(LockedError, match="was taken"):
                storage.write_bytes_atomic(storage.path("digits", "x", "manifest.json"), b"{}")
            with pytest.raises(LockedError, match="was taken"):
                publish_dir(storage, str(_model_dir(tmp_path / "m", "one")),
                            storage.path("digits", "classifiers", "run"), last=(CARD,))
    assert not storage.exists(storage.path("digits", "x"))
    assert not storage.exists(storage.path("digits", "classifiers"))
    storage.write_bytes_atomic(storage.path("digits", "y.json"), b"{}")  # guard gone with it


def _checkpointed_s3(storage) -> bool:
    """Whether the classifier worker group registered a checkpoint on the S3 root (as
    tests/faults.checkpointed does on local disk)."""
    import pyarrow.fs as pafs

    directory = storage.path("digits", "ray_train")
    if not storage.exists(directory):
        return False
    for info in storage.fs.get_file_info(pafs.FileSelector(directory)):
        snapshot = f"{info.path}/checkpoint_manager_snapshot.json"
        if "classifiers" in info.base_name and storage.exists(snapshot):
            try:
                if json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result"):
                    return True
            except (ValueError, OSError):  # mid-write
                continue
    return False


@pytest.mark.integration
def test_s3_run_killed_mid_train_rerun_equals_local_disk(tiny_reference, s3_server, tmp_path,
                                                         capsys):
    """The whole `oodscale run` on an s3:// root, killed (driver and its Ray) mid-train and
    run again: every stage equals the local-disk reference bit for bit; status, verify,
    predict and Detector.load work there and agree with a local-disk copy."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image
    from safetensors.torch import load as load_safetensors

    from oodscale.cli import main
    from oodscale.data.shards import load_arrays
    from oodscale.detector import Detector
    from tests.faults import CONFIG, RUN, TINY, args, copy, weights
    from tests.procs import kill_tree, start_cli, wait_for

    root = s3_server("run")
    storage = open_storage(root)
    argv = [CONFIG, f"storage.root={root}", *TINY]
    cli = start_cli(["run", *argv, "ray.num_cpus=4"], tmp_path / "killed.log")
    wait_for(lambda: _checkpointed_s3(storage), "the killed run's first checkpoint on S3", 900)
    kill_tree(cli)
    classifier = storage.path("digits", "classifiers", RUN)
    assert not storage.exists(f"{classifier}/{CARD}")  # killed mid-train
    assert main(["run", *argv]) == 0
    assert "taking over the stale lock" in capsys.readouterr().out  # the killed driver's lock
    card = json.loads(storage.read_bytes(f"{classifier}/{CARD}"))
    assert card["train"]["first_epoch"] >= 1 and card["epoch"] == 2  # resumed
    mine, reference = load_safetensors(storage.read_bytes(f"{classifier}/{WEIGHTS}")), \
        weights(tiny_reference)
    assert mine.keys() == reference.keys()
    assert all(bool((mine[k] == reference[k]).all()) for k in mine)
    results = pd.read_parquet(io.BytesIO(storage.read_bytes(
        storage.path("digits", "eval", "results.parquet"))))
    pd.testing.assert_frame_equal(
        results, pd.read_parquet(tiny_reference / "digits" / "eval" / "results.parquet"))
    assert main(["status", *argv]) == 0
    assert main(["verify", *argv]) == 0

    local = copy(tiny_reference, tmp_path / "local", ["data", "classifiers"])
    assert main(["calibrate", *args(local)]) == 0
    local_dir = local / "digits" / "classifiers" / RUN
    assert json.loads(storage.read_bytes(f"{classifier}/calibration.json"))["scores"] == \
        json.loads((local_dir / "calibration.json").read_text())["scores"]
    images = load_arrays(storage, storage.path("digits", "data", "id", "test"))[0][:40]
    on_s3 = Detector.load(storage.open_uri(classifier), score="energy").predict(images)
    on_disk = Detector.load(local_dir, score="energy").predict(images)
    np.testing.assert_array_equal(on_s3.score, on_disk.score)
    np.testing.assert_array_equal(on_s3.is_ood, on_disk.is_ood)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images[:5]):
        Image.fromarray(image[:, :, 0]).resize((32, 32)).save(folder / f"digit{i}.png")
    rows = {}
    for name, overrides in (("s3", argv), ("disk", args(local))):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", *overrides, "--run", RUN, "--score", "energy", str(folder),
                     "--out", str(out)]) == 0
        rows[name] = pd.read_csv(out)
    assert len(rows["s3"]) == 5
    pd.testing.assert_frame_equal(rows["s3"], rows["disk"])
