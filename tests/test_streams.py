"""Rows into training workers: the in-memory cache for small sets, the shared stream for large
ones, and labels checked when shards are read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodscale.data.shards import (
    Manifest,
    ShardError,
    ShardInfo,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from oodscale.data.streams import (
    CachedShards,
    RankData,
    read_rows,
    read_shards,
    rows_fit_in_cache,
    training_set,
)
from oodscale.runtime import open_storage


def _rows(ray, n: int):
    items = [{"image": np.full((1, 2, 2), i, dtype=np.uint8), "label": i} for i in range(n)]
    return ray.data.from_items(items).iterator()


def _shard_set(root, n: int, shards: int = 2, directory: str = "id", size: int = 2,
               reverse: bool = False) -> CachedShards:
    """`n` real samples (image i everywhere, label i) in `shards` shards and their manifest;
    `reverse` lists the shards in the other order."""
    storage = open_storage(str(root))
    path = storage.path(directory)
    infos = [write_shard(storage, path, shard_name("train", k), (
        (f"s{i:04d}", np.full((size, size, 1), i, np.uint8), {"label": i})
        for i in range(k, n, shards))) for k in range(shards)]
    write_manifest(storage, path, Manifest(
        kind="id", split="train", image_size=size, channels=1,
        class_names=[str(i) for i in range(max(n, 2))],
        shards=infos[::-1] if reverse else infos))
    return CachedShards(storage.uri, path)


def test_cached_rows_are_read_once_and_every_pass_is_a_permutation(tmp_path):
    data = RankData(_shard_set(tmp_path, 20), "cpu")
    batches = data.batches(4, seed=0)
    first_pass = torch.cat([next(batches)["label"] for _ in range(5)])
    second_pass = torch.cat([next(batches)["label"] for _ in range(5)])
    assert sorted(first_pass.tolist()) == sorted(second_pass.tolist()) == list(range(20))
    assert not torch.equal(first_pass, second_pass)  # reshuffled
    again = torch.cat([next(data.batches(4, seed=0))["label"] for _ in range(1)])
    assert torch.equal(again, first_pass[:4])  # the order is the seed's alone
    batch = next(batches)
    assert torch.equal(batch["image"][:, 0, 0, 0].long(), batch["label"])  # rows stay whole
    assert batch["image"].shape[1:] == (1, 2, 2) and batch["image"].dtype == torch.uint8


def test_cached_ranks_share_out_the_rows_the_same_way_whatever_order_they_are_listed_in(
        tmp_path):
    ranks = [[RankData(_shard_set(tmp_path / str(reverse), 20, 3, reverse=reverse), "cpu",
                       rank, 2)._load()["label"] for rank in (0, 1)]
             for reverse in (False, True)]
    assert all(torch.equal(a, b) for a, b in zip(*ranks, strict=True))  # listing order: moot
    mine, theirs = ranks[0]
    assert len(mine) == len(theirs) == 10 and not set(mine.tolist()) & set(theirs.tolist())
    with pytest.raises(ValueError, match="fewer rows than the 4 workers"):
        RankData(_shard_set(tmp_path / "few", 3), "cpu", 3, 4)._load()


@pytest.mark.integration
def test_a_worker_reads_a_cached_set_as_ray_data_reads_it(ray_cluster, tmp_path):
    cached = _shard_set(tmp_path, 30, 3, size=3)
    storage = open_storage(cached.storage_uri)
    direct = read_rows(storage, cached.directory)
    dataset, _ = read_shards(storage, cached.directory)
    ray_rows = sorted(dataset.take_all(), key=lambda row: row["order"])
    by_order = direct["order"].argsort()
    assert direct["order"][by_order].tolist() == [row["order"] for row in ray_rows]
    assert direct["label"][by_order].tolist() == [row["label"] for row in ray_rows]
    assert torch.equal(direct["image"][by_order],
                       torch.as_tensor(np.stack([row["image"] for row in ray_rows])))


@pytest.mark.integration
def test_streamed_rows_continue_one_stream_across_cells(ray_cluster):
    data = RankData(_rows(ray_cluster, 16), "cpu")
    assert not data.cached
    assert data.batches(4, seed=0) is data.batches(4, seed=1)  # no split left half-read
    with pytest.raises(ValueError, match="streams batches of 4; a cell asked for 8"):
        data.batches(8, seed=0)


def test_too_few_cached_rows_for_a_batch_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        next(RankData(_shard_set(tmp_path, 5), "cpu").batches(8, seed=0))


@pytest.mark.integration
def test_the_cache_decision_picks_what_the_workers_read(ray_cluster, tmp_path):
    cached = _shard_set(tmp_path, 10)
    storage = open_storage(cached.storage_uri)
    small, manifest = training_set(storage, cached.directory, num_workers=1, cache_mb=1)
    assert small == cached and manifest.num_samples == 10
    streamed, _ = training_set(storage, cached.directory, num_workers=1, cache_mb=0)
    assert not isinstance(streamed, CachedShards) and streamed.count() == 10


def test_cache_decision_follows_the_per_worker_size():
    cifar = Manifest(kind="id", split="train", image_size=32, channels=3, class_names=["a", "b"],
                     shards=[ShardInfo("train-000000.tar", 50_000, "0" * 64)])  # 150 MiB uint8
    assert rows_fit_in_cache(cifar, 1, 1024)
    assert not rows_fit_in_cache(cifar, 1, 100)
    assert rows_fit_in_cache(cifar, 2, 100)  # 75 MiB per worker


@pytest.mark.integration
def test_a_label_outside_the_manifests_classes_is_refused_when_read(ray_cluster, tmp_path):
    storage = open_storage(str(tmp_path))
    samples = [(f"k{i}", np.zeros((4, 4, 1), np.uint8), {"label": label})
               for i, label in enumerate([0, 1, 7])]
    info = write_shard(storage, storage.path("id"), shard_name("train", 0), samples)
    write_manifest(storage, storage.path("id"), Manifest(
        kind="id", split="train", image_size=4, channels=1, class_names=["a", "b"],
        shards=[info]))
    data, _ = read_shards(storage, storage.path("id"))
    with pytest.raises(Exception, match="label 7, outside \\[0, 2\\)"):
        data.take_all()
    with pytest.raises(ValueError, match="label 7, outside \\[0, 2\\)"):
        read_rows(storage, storage.path("id"))  # a worker's cached read checks them too


def test_a_cached_sample_of_the_wrong_size_is_refused_naming_it(tmp_path):
    cached = _shard_set(tmp_path, 4)
    storage = open_storage(cached.storage_uri)
    info = write_shard(storage, cached.directory, shard_name("train", 9),
                       [("odd", np.zeros((3, 3, 1), np.uint8), {"label": 0})])
    manifest = read_manifest(storage, cached.directory)
    manifest.shards.append(info)
    write_manifest(storage, cached.directory, manifest)
    with pytest.raises(ShardError, match="sample 'odd' in .*train-000009.tar is 3x3x1, its "
                                         "manifest says 2x2x1"):
        read_rows(storage, cached.directory)


def test_a_damaged_cached_shard_is_refused_before_any_worker_reads_it(tmp_path):
    cached = _shard_set(tmp_path, 4)
    storage = open_storage(cached.storage_uri)
    shard = tmp_path / "id" / shard_name("train", 1)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ShardError, match="train-000001.tar is corrupt"):
        training_set(storage, cached.directory, num_workers=1, cache_mb=1)
