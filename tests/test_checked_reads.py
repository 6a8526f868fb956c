"""Readers check what they read: size and sha256 against the manifest, the same error as verify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from oodscale.cli import main
from oodscale.data import shards
from oodscale.data.shards import (
    Manifest,
    ShardError,
    drop_damaged,
    read_manifest,
    shard_paths,
    verify_shards,
    write_split,
)
from oodscale.runtime import open_storage
from tests.support import CONFIG


def _split(tmp_path: Path, n: int = 12) -> tuple:
    storage = open_storage(str(tmp_path))
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    manifest = write_split(storage, storage.path("d"), "train", images,
                           [{"label": i % 2} for i in range(n)], 4,
                           Manifest(kind="id", split="train", image_size=8, channels=1,
                                    class_names=["a", "b"]))
    return storage, storage.path("d"), manifest


def _flip_byte(path: Path, offset: int = 600) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _error(fn, *args) -> str:
    with pytest.raises(ShardError) as info:
        fn(*args)
    return str(info.value)


def test_manifest_records_sizes(tmp_path):
    _, _, manifest = _split(tmp_path)
    for info in manifest.shards:
        assert info.size == (tmp_path / "d" / info.path).stat().st_size


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_readers_refuse_a_damaged_shard_with_verifys_error(tmp_path, damage):
    storage, directory, manifest = _split(tmp_path)
    shard = tmp_path / "d" / "train-000001.tar"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-512])
    elif damage == "flip":  # same size: only the checksum can see it
        _flip_byte(shard)
    else:
        shard.unlink()
    verify = _error(verify_shards, storage, directory)
    read = _error(shard_paths, storage, directory, manifest)
    assert read == verify and "train-000001.tar" in read
    assert {"truncate": "size", "flip": "sha256", "delete": "is missing"}[damage] in read


def test_each_shard_is_hashed_once_per_process_unless_it_changes(tmp_path, monkeypatch):
    storage, directory, manifest = _split(tmp_path)
    checked = []
    original = shards.shard_problem
    monkeypatch.setattr(shards, "shard_problem",
                        lambda s, d, info: checked.append(info.path) or original(s, d, info))
    shard_paths(storage, directory, manifest)
    shard_paths(storage, directory, manifest)
    assert sorted(checked) == sorted(s.path for s in manifest.shards)  # once each
    _flip_byte(tmp_path / "d" / "train-000002.tar")  # a changed file is checked again
    with pytest.raises(ShardError, match="train-000002.tar is corrupt"):
        shard_paths(storage, directory, manifest)


def test_drop_damaged_keeps_the_good_entries(tmp_path):
    storage, directory, manifest = _split(tmp_path)
    _flip_byte(tmp_path / "d" / "train-000000.tar")
    problems = drop_damaged(storage, directory, manifest)
    assert len(problems) == 1 and "train-000000.tar" in problems[0]
    assert [s.path for s in manifest.shards] == ["train-000001.tar", "train-000002.tar"]


@pytest.mark.integration
def test_train_and_evaluate_refuse_a_damaged_shard(tmp_path, ray_cluster, capsys):
    overrides = [f"storage.root={tmp_path}", "data.ood_sets=[gaussian]", "data.ood_samples=20",
                 "data.shard_size=300", "train.outliers=[none]", "train.losses=[softmax]"]
    assert main(["prepare", CONFIG, *overrides]) == 0
    capsys.readouterr()
    storage = open_storage(str(tmp_path))
    id_train = storage.path("digits", "data", "id", "train")
    first = read_manifest(storage, id_train).shards[0].path
    _flip_byte(tmp_path / "digits" / "data" / "id" / "train" / first, offset=2000)
    assert main(["verify", CONFIG, *overrides]) == 1
    verify_err = capsys.readouterr().err.split("error: ", 1)[1]
    assert main(["train", CONFIG, *overrides]) == 1
    assert capsys.readouterr().err.split("error: ", 1)[1] == verify_err
    assert not (tmp_path / "digits" / "classifiers").exists()  # refused before training

    gauss = tmp_path / "digits" / "data" / "ood" / "gaussian" / "gaussian-000000.tar"
    gauss.write_bytes(gauss.read_bytes()[:-1024])
    assert main(["evaluate", CONFIG, *overrides]) == 1
    err = capsys.readouterr().err
    assert "gaussian-000000.tar is corrupt (size" in err
    assert not (tmp_path / "digits" / "eval").exists()
