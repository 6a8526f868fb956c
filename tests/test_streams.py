"""Rows into training workers: the in-memory cache for small sets, the shared stream for large
ones, and labels checked when shards are read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodscale.data.shards import Manifest, ShardInfo, shard_name, write_manifest, write_shard
from oodscale.data.streams import RankData, read_shards, rows_fit_in_cache
from oodscale.runtime import open_storage

pytestmark = pytest.mark.integration


def _rows(ray, n: int, reverse: bool = False):
    # `order` as read_shards makes it: a fixed number per sample, unrelated to arrival order
    items = [{"image": np.full((1, 2, 2), i, dtype=np.uint8), "label": i,
              "order": (i * 7919) % 10007} for i in range(n)]
    return ray.data.from_items(items[::-1] if reverse else items).iterator()


def test_cached_rows_are_read_once_and_every_pass_is_a_permutation(ray_cluster):
    data = RankData(_rows(ray_cluster, 20), "cpu", cached=True)
    batches = data.batches(4, seed=0)
    first_pass = torch.cat([next(batches)["label"] for _ in range(5)])
    second_pass = torch.cat([next(batches)["label"] for _ in range(5)])
    assert sorted(first_pass.tolist()) == sorted(second_pass.tolist()) == list(range(20))
    assert not torch.equal(first_pass, second_pass)  # reshuffled
    again = torch.cat([next(data.batches(4, seed=0))["label"] for _ in range(1)])
    assert torch.equal(again, first_pass[:4])  # the order is the seed's alone
    batch = next(batches)
    assert torch.equal(batch["image"][:, 0, 0, 0].long(), batch["label"])  # rows stay whole


def test_cached_ranks_share_out_the_rows_the_same_way_whatever_order_they_arrive_in(
        ray_cluster):
    ranks = [[RankData(_rows(ray_cluster, 20, reverse), "cpu", True, rank, 2)._load()["label"]
              for rank in (0, 1)] for reverse in (False, True)]
    assert all(torch.equal(a, b) for a, b in zip(*ranks, strict=True))  # arrival order: moot
    mine, theirs = ranks[0]
    assert len(mine) == len(theirs) == 10 and not set(mine.tolist()) & set(theirs.tolist())
    with pytest.raises(ValueError, match="fewer rows than the 4 workers"):
        RankData(_rows(ray_cluster, 3), "cpu", True, 3, 4)._load()


def test_streamed_rows_continue_one_stream_across_cells(ray_cluster):
    data = RankData(_rows(ray_cluster, 16), "cpu", cached=False)
    assert data.batches(4, seed=0) is data.batches(4, seed=1)  # no split left half-read
    with pytest.raises(ValueError, match="streams batches of 4; a cell asked for 8"):
        data.batches(8, seed=0)


def test_too_few_cached_rows_for_a_batch_is_a_named_error(ray_cluster):
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        next(RankData(_rows(ray_cluster, 5), "cpu", cached=True).batches(8, seed=0))


def test_cache_decision_follows_the_per_worker_size():
    cifar = Manifest(kind="id", split="train", image_size=32, channels=3, class_names=["a", "b"],
                     shards=[ShardInfo("train-000000.tar", 50_000, "0" * 64)])  # 150 MiB uint8
    assert rows_fit_in_cache(cifar, 1, 1024)
    assert not rows_fit_in_cache(cifar, 1, 100)
    assert rows_fit_in_cache(cifar, 2, 100)  # 75 MiB per worker


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
