"""Fashion-MNIST: the idx reader on files the test writes, and the real package's splits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from oodscale.classify.grid import grid
from oodscale.config import ConfigError, load_config
from oodscale.data import builtin
from oodscale.data.fashion_mnist import DEBIAN_PATH, fashion_splits, load_split, read_idx
from oodscale.data.prepare import prepare
from oodscale.data.shards import load_arrays, read_manifest
from oodscale.runtime import layout_for
from tests.support import FASHION


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_release(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for images, labels in (("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                           ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        _write_idx(root / images, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / labels, np.arange(n) % 10)


def test_idx_reader_round_trips_and_refuses_damage(tmp_path):
    _fake_release(tmp_path, 30)
    images, labels = load_split(str(tmp_path), "train")
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(30)]
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(cut)
    wrong = tmp_path / "wrong.gz"
    wrong.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + raw[4:]))
    with pytest.raises(ValueError, match="not an unsigned-byte idx"):
        read_idx(wrong)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_split(str(tmp_path), "test")


def test_open_set_split_of_the_real_package():
    train, test, held, held_val = fashion_splits(None, 20, 1, [0, 1, 2, 3, 4, 5], 50, 20, 0)
    assert train.images.shape == (300, 20, 20, 1)
    assert np.bincount(train.labels).tolist() == [50] * 6
    assert np.bincount(test.labels).tolist() == [20] * 6
    assert train.class_names[:2] == ["t-shirt", "trouser"] and train.class_names[-1] == "sandal"
    # Near-OOD: every test image of shirt, sneaker, bag and ankle boot, none from training.
    _, test_labels = load_split(DEBIAN_PATH, "test")
    assert len(held.images) == int(np.isin(test_labels, [6, 7, 8, 9]).sum()) == 4000
    assert (held.labels == -1).all()
    # Their validation counterpart: the same classes' training images (another source split).
    assert len(held_val.images) == 4 * 6000 and (held_val.labels == -1).all()


def test_prepare_writes_the_benchmark_splits(tmp_path):
    overrides = [f"storage.root={tmp_path}", "data.max_train_per_class=20",
                 "data.max_test_per_class=10", "data.ood_samples=8",
                 "data.ood_sets=[openset,digits,textures]"]
    cfg = load_config(FASHION, overrides)
    prepare(cfg, layout_for(cfg))
    layout = layout_for(cfg)
    train = read_manifest(layout.storage, layout.id_split("train"))
    val = read_manifest(layout.storage, layout.id_split("val"))
    assert train.num_samples + val.num_samples == 120 and train.image_size == 16
    images, metas = load_arrays(layout.storage, layout.ood_set("digits"))
    assert images.shape == (8, 16, 16, 1) and {m["label"] for m in metas} == {-1}
    assert read_manifest(layout.storage, layout.ood_set("openset")).extra["group"] == "near"
    # The OOD validation sets: the open-set classes' training images, digits the test set did
    # not draw (and fresh noise); no twin for crops of the shipped textures.
    assert cfg.data.validation_ood_sets == ["openset", "digits"]
    assert read_manifest(layout.storage, layout.ood_val_set("openset")).num_samples == 8
    assert read_manifest(layout.storage, layout.ood_val_set("digits")).num_samples == 8


def test_digits_validation_images_are_never_test_images():
    test, val = (builtin._digits_pick(None, 0, purpose, 300) for purpose in ("ood", "ood-val"))
    assert len(test) == 1797 - 300 and len(val) == 300 and not set(test) & set(val)
    capped = builtin._digits_pick(200, 0, "ood", 300)
    assert len(capped) == 200 and set(capped) <= set(test)  # a cap draws from the same pool
    with pytest.raises(ValueError, match="data.val_ood_samples"):
        builtin._digits_pick(None, 0, "ood-val", 1797)


def test_the_benchmark_grid_and_its_checks():
    cfg = load_config(FASHION)
    cells = {(s.loss, s.outliers) for s in grid(cfg)}
    assert len(grid(cfg)) == 3 * len(cells) == 66
    assert ("arcface", "pixelmix") in cells and ("cosface", "pixelmix") not in cells
    assert ("adacos", "labelmix-ft") in cells
    assert cfg.train.outlier_sources[-1] == "labelmix+pixelmix"
    # enough outliers that none is shown more than about twice over a cell's training
    steps = 3240 // (cfg.train.batch_size * cfg.train.num_workers)
    draws = cfg.train.epochs * steps * cfg.train.num_workers * cfg.train.outlier_batch_size
    assert draws <= 2 * cfg.generate.num_shards * cfg.generate.samples_per_shard
    with pytest.raises(ConfigError, match="'digits' OOD set"):
        load_config(FASHION, ["data.source=digits"])
    with pytest.raises(ConfigError, match="labelmix-w"):
        load_config(FASHION, ["train.extra_cells=[{losses: [softmax], outliers: [bogus]}]"])
