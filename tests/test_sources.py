"""External data: an ImageFolder tree (ImageNet's layout) and bring-your-own OOD sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodscale.cli import main
from oodscale.data.shards import load_arrays, read_manifest, tar_bytes
from oodscale.runtime import open_storage
from tests.support import CONFIG, SMALL_OOD, imagefolder


def _imagefolder(root: Path, classes: list[str], per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(20, 60, 2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            suffix = ".JPEG" if i % 2 else ".png"
            Image.fromarray(pixels).save(root / name / f"img{c}_{i}{suffix}")


def test_imagefolder_tree_becomes_id_shards(tmp_path, ray_cluster):
    data = tmp_path / "imagenet"
    _imagefolder(data / "train", ["n01", "n02", "n03"], 7, seed=0)
    _imagefolder(data / "val", ["n01", "n02", "n03"], 3, seed=1)
    root = tmp_path / "runs"
    overrides = [f"storage.root={root}", *imagefolder(data, 12), "data.shard_size=4",
                 *SMALL_OOD]
    assert main(["prepare", CONFIG, *overrides]) == 0
    storage = open_storage(str(root))
    train_dir = storage.path("digits", "data", "id", "train")
    manifest = read_manifest(storage, train_dir)
    assert manifest.class_names == ["n01", "n02", "n03"]
    assert manifest.num_samples == 18 and len(manifest.shards) == 5  # shard_size 4
    images, metas = load_arrays(storage, train_dir)
    assert images.shape == (18, 12, 12, 3)
    assert sorted(m["label"] for m in metas) == sorted([0] * 6 + [1] * 6 + [2] * 6)
    # data.val_fraction 0.1 of the 21 training images, stratified: one per class
    _, val_metas = load_arrays(storage, storage.path("digits", "data", "id", "val"))
    assert sorted(m["label"] for m in val_metas) == [0, 1, 2]
    test = read_manifest(storage, storage.path("digits", "data", "id", "test"))
    assert test.num_samples == 9
    # Deterministic: preparing again (forced) gives byte-identical shards.
    first = [s.sha256 for s in manifest.shards]
    from oodscale.config import load_config
    from oodscale.data.prepare import prepare
    from oodscale.runtime import layout_for

    prepare(load_config(CONFIG, overrides), layout_for(load_config(CONFIG, overrides)), force=True)
    assert [s.sha256 for s in read_manifest(storage, train_dir).shards] == first


def test_bring_your_own_ood_sets(tmp_path, ray_cluster):
    folder = tmp_path / "my_ood"
    _imagefolder(folder, ["any"], 5, seed=2)
    shards = tmp_path / "my_wds"
    shards.mkdir()
    pixels = np.random.default_rng(3).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    (shards / "part-000000.tar").write_bytes(tar_bytes([("s0", pixels, {}), ("s1", pixels, {})])[0])
    root = tmp_path / "runs"
    overrides = [f"storage.root={root}", "data.ood_sets=[openset]", "data.ood_samples=10",
                 f"data.extra_ood=[{{name: mine, path: '{folder}'}}]"]  # by path in config ...
    # ... and on the command line
    assert main(["prepare", CONFIG, "--ood", f"theirs={shards},webdataset,near", *overrides]) == 0
    storage = open_storage(str(root))
    mine = read_manifest(storage, storage.path("digits", "data", "ood", "mine"))
    theirs = read_manifest(storage, storage.path("digits", "data", "ood", "theirs"))
    assert (mine.num_samples, theirs.num_samples) == (5, 2)
    assert theirs.extra["group"] == "near" and mine.extra["group"] == "far"
    images, _ = load_arrays(storage, storage.path("digits", "data", "ood", "mine"))
    assert images.shape == (5, 16, 16, 1)


def test_missing_imagefolder_is_a_clear_error(tmp_path, ray_cluster, capsys):
    overrides = [f"storage.root={tmp_path}", "data.source=imagefolder",
                 f"data.path={tmp_path / 'nowhere'}", "data.id_classes=null",
                 "data.ood_sets=[gaussian]"]
    assert main(["prepare", CONFIG, *overrides]) == 1
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["data.id_classes=[0,11]"])
def test_id_class_out_of_range(tmp_path, bad, capsys, ray_cluster):
    assert main(["prepare", CONFIG, f"storage.root={tmp_path}", bad]) == 1
    assert "out of range" in capsys.readouterr().err


def test_ood_flag_errors_name_the_problem(tmp_path, capsys):
    assert main(["prepare", CONFIG, "--ood", "bad", f"storage.root={tmp_path}"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    root = f"storage.root={tmp_path}"
    assert main(["prepare", CONFIG, "--ood", f"openset={tmp_path}", root]) == 2
    assert "used twice" in capsys.readouterr().err
