"""Bad input stops with an error naming the thing and the fix; nothing finished is lost."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodscale.classify.checkpoints import WEIGHTS, load_classifier, save_classifier
from oodscale.classify.train import RunSpec, _card
from oodscale.cli import main
from oodscale.config import load_config
from oodscale.data.shards import load_arrays, read_manifest, write_split
from oodscale.diffusion.model import LabelConditionedUNet, load_unet
from oodscale.runtime import open_storage
from tests.experiment import hand_calibrated
from tests.support import CONFIG, ONE_CELL, REPO, SMALL_OOD, imagefolder


def _folder(root: Path, classes: list[str], per_class: int, modes: tuple[str, ...] = ("RGB",)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(modes[i % len(modes)]).save(root / name / f"{i}.png")


def _imagefolder_args(tmp_path: Path, data: Path) -> list[str]:
    return [f"storage.root={tmp_path / 'runs'}", *imagefolder(data, 12), "data.shard_size=8",
            *SMALL_OOD]


@pytest.mark.integration
def test_undecodable_image_among_many_is_named(tmp_path, ray_cluster, capsys):
    data = tmp_path / "images"
    _folder(data / "train", ["a", "b"], 12)
    (data / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert main(["prepare", CONFIG, *_imagefolder_args(tmp_path, data)]) == 1
    err = capsys.readouterr().err
    ours = err[err.index("oodscale prepare: error: "):]
    assert "cannot decode image" in ours and "broken.png" in ours and "remove or replace" in ours
    assert not (tmp_path / "runs" / "digits" / "data" / "id" / "train" / "manifest.json").exists()


@pytest.mark.integration
def test_grayscale_rgb_mix_is_converted_to_the_configured_channels(tmp_path, ray_cluster):
    data = tmp_path / "images"
    for split in ("train", "val"):
        _folder(data / split, ["a", "b"], 8, modes=("RGB", "L", "RGBA", "P"))
    assert main(["prepare", CONFIG, *_imagefolder_args(tmp_path, data)]) == 0
    storage = open_storage(str(tmp_path / "runs"))
    images, _ = load_arrays(storage, storage.path("digits", "data", "id", "test"))
    assert images.shape == (16, 12, 12, 3)


def test_imagefolder_with_one_class_is_refused(tmp_path, capsys):
    data = tmp_path / "images"
    _folder(data / "train", ["only"], 4)
    from oodscale.data.sources import list_imagefolder

    with pytest.raises(ValueError, match=r"one class directory \(only\).*--ood NAME="):
        list_imagefolder(str(data / "train"))


@pytest.mark.integration
def test_empty_ood_set_is_named(tmp_path, ray_cluster, capsys):
    empty = tmp_path / "my_ood"
    (empty / "nothing_here").mkdir(parents=True)
    args = [f"storage.root={tmp_path}", *SMALL_OOD]
    assert main(["prepare", CONFIG, "--ood", f"mine={empty}", *args]) == 1
    assert "OOD set mine: no images under" in capsys.readouterr().err
    assert (tmp_path / "digits" / "data" / "ood" / "gaussian" / "manifest.json").is_file()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("bad_inputs")
    args = [f"storage.root={root}", "data.ood_sets=[gaussian]", "data.ood_samples=16",
            *ONE_CELL]
    assert main(["prepare", CONFIG, *args]) == 0
    return root, args


@pytest.mark.integration
def test_label_out_of_range_in_a_shard_is_named(prepared, capsys, tmp_path):
    root, args = prepared
    shutil.copytree(root / "digits" / "data", tmp_path / "digits" / "data")
    storage = open_storage(str(tmp_path))
    test_dir = storage.path("digits", "data", "id", "test")
    images, metas = load_arrays(storage, test_dir)
    metas[3] = {"label": 9}  # a shard of another dataset, listed with valid checksums
    write_split(storage, test_dir, "test", images, metas, 500, read_manifest(storage, test_dir))
    capsys.readouterr()
    assert main(["evaluate", CONFIG, *args, f"storage.root={tmp_path}"]) == 1
    err = capsys.readouterr().err
    ours = err[err.index("oodscale evaluate: error: "):]
    assert "label 9, outside [0, 6)" in ours and "test-000000.tar" in ours


@pytest.mark.integration
def test_classifier_of_other_classes_is_refused(prepared, capsys):
    root, args = prepared
    cfg = load_config(CONFIG, args)
    storage = open_storage(str(root))
    manifest = read_manifest(storage, storage.path("digits", "data", "id", "train"))
    manifest.class_names = ["0", "1", "2", "3"]  # a classifier of four classes
    card = _card(cfg, RunSpec("softmax", "none", 0), manifest)
    from oodscale.classify.checkpoints import classifier_from_card

    save_classifier(classifier_from_card(card), card,
                    root / "digits" / "classifiers" / "softmax-none-s0")
    capsys.readouterr()
    assert main(["evaluate", CONFIG, *args]) == 1
    err = capsys.readouterr().err
    assert "classifier softmax-none-s0 was trained on 4 classes" in err
    assert "rerun `oodscale train`" in err


@pytest.mark.integration
def test_generator_of_other_classes_is_refused(prepared, capsys):
    root, args = prepared
    diffusion = root / "digits" / "diffusion"
    diffusion.mkdir(parents=True, exist_ok=True)
    (diffusion / "model.json").write_text(json.dumps({
        "num_classes": 4, "class_names": ["0", "1", "2", "3"], "image_size": 16, "channels": 1,
        "timesteps": 50, "model_hash": "0" * 16, "epochs": 1}))
    capsys.readouterr()
    assert main(["generate", CONFIG, *args, "train.outliers=[labelmix]"]) == 1
    err = capsys.readouterr().err
    assert "unknown to the generator" in err and "'4', '5'" in err
    assert not list((root / "digits").glob("synthetic*/manifest.json"))


def test_ray_address_that_does_not_answer_fails_fast(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "oodscale"), "prepare", CONFIG, "--address",
         f"127.0.0.1:{port}", f"storage.root={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in done.stderr
    assert "RAY_ADDRESS" in done.stderr


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_classifier_weights_are_refused(tmp_path, zip_format):
    card = {"backbone": "smallcnn", "loss": "softmax", "channels": 1, "image_size": 16,
            "num_classes": 3, "embedding_dim": 8, "head_options": {}, "run": "x"}
    from oodscale.classify.checkpoints import classifier_from_card

    save_classifier(classifier_from_card(card), card, tmp_path)
    state = classifier_from_card(card).state_dict()
    torch.save(state, tmp_path / WEIGHTS, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match="is a pickle.*never unpickles"):
        load_classifier(tmp_path)


def test_pickled_ddpm_is_refused(tmp_path):
    unet = LabelConditionedUNet(num_classes=3, sample_size=8, in_channels=1,
                                block_out_channels=(8, 8))
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)  # a pickle .bin
    with pytest.raises(FileNotFoundError, match="safetensors files only"):
        load_unet(open_storage(str(tmp_path)), str(tmp_path / "unet"))


def _linked_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of three images with a loop (`sub/up -> ..`), links out of the tree (to a
    folder and to a file), a dangling link and a link to an image inside it."""
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (tree / "sub").mkdir(parents=True)
    outside.mkdir()
    pixels = np.zeros((8, 8, 3), np.uint8)
    for path in (tree / "a.png", tree / "sub" / "b.png", tree / "sub" / "c.png",
                 outside / "x.png"):
        Image.fromarray(pixels).save(path)
    (tree / "sub" / "up").symlink_to("..")
    (tree / "out").symlink_to(outside)
    (tree / "far.png").symlink_to(outside / "x.png")
    (tree / "gone.png").symlink_to(tmp_path / "nothing.png")
    (tree / "again.png").symlink_to(tree / "a.png")
    return tree, outside


def test_folder_walk_follows_no_loop_and_no_link_out_of_the_tree(tmp_path):
    from oodscale.data.images import list_folder
    from oodscale.predict import iter_image_paths

    tree, _ = _linked_tree(tmp_path)
    listing = list_folder(open_storage(str(tree)), str(tree))
    assert listing.files == [str(tree / n) for n in ("a.png", "again.png", "sub/b.png",
                                                     "sub/c.png")]
    assert listing.links == [str(tree / n) for n in ("far.png", "gone.png", "out", "sub/up")]
    assert [f.base for f in iter_image_paths([str(tree)])] == listing.files  # predict's walk
    assert "links not followed" in listing.skipped()[0]


def test_imagefolder_class_linked_out_of_the_tree_is_not_read(tmp_path):
    from oodscale.data.sources import list_imagefolder

    _folder(tmp_path / "data", ["a", "b"], 2)
    _folder(tmp_path / "elsewhere", ["c"], 2)
    (tmp_path / "data" / "c").symlink_to(tmp_path / "elsewhere" / "c")
    (tmp_path / "data" / "a" / "loop").symlink_to(tmp_path / "data")
    files, labels, classes = list_imagefolder(str(tmp_path / "data"))
    assert classes == ["a", "b"] and labels == [0, 0, 1, 1]
    assert all("elsewhere" not in f and "loop" not in f for f in files)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (8-bit gray) and whose pixel data is junk:
    anything that decodes it before checking the header would allocate width*height bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"x" * 64)
            + chunk(b"IEND", b""))


@pytest.mark.parametrize(("width", "height", "message"), [
    (8000, 6000, r"8000x6000 \(48.0 megapixels\), above the cap of 40 "
                 r"\(data.max_image_megapixels\)"),
    (10000, 9500, "decompression bomb"),  # Pillow's warning (89-179 Mpx), an error here
    (100000, 100000, "decompression bomb"),  # Pillow's own error
])
def test_image_over_the_pixel_cap_is_refused_before_decoding(tmp_path, width, height, message):
    from oodscale.data.images import BadImageError
    from oodscale.detector import training_images

    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(width, height))
    with pytest.raises(BadImageError, match=message) as caught:
        training_images([path], 16, 1)
    assert str(path) in str(caught.value)


def test_image_file_over_the_size_cap_is_refused_before_reading(tmp_path):
    from oodscale.data.images import BadImageError, ImageLimits
    from oodscale.detector import training_images

    cfg = load_config(CONFIG, ["data.max_image_mb=0.001"])
    assert load_config(CONFIG).data.max_image_mb == 64.0
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(path)
    with pytest.raises(BadImageError, match=r"big.png is 0.0 MB, above the cap of 0.0 MB "
                                            r"\(data.max_image_mb\)"):
        training_images([path], 16, 1, ImageLimits.from_config(cfg.data))


def test_only_the_supported_image_formats_are_opened(tmp_path):
    from oodscale.data.images import BadImageError
    from oodscale.detector import training_images

    path = tmp_path / "really_a_gif.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path, format="GIF")
    with pytest.raises(BadImageError, match=r"cannot decode image .*really_a_gif.png.*formats "
                                            r"read: JPEG, PNG"):
        training_images([path], 16, 1)


@pytest.fixture
def calibrated(tmp_path):
    """`hand_calibrated` under tmp_path/runs: (config, layout, run)."""
    from oodscale.runtime import layout_for

    cfg = load_config(CONFIG, [f"storage.root={tmp_path / 'runs'}", "evaluate.batch_size=2"])
    hand_calibrated(tmp_path / "runs")
    return cfg, layout_for(cfg), "x-none-s0"


def _hostile_folder(folder: Path) -> list[Path]:
    """Two good images, then a truncated PNG, a text file named .png and an empty .jpg, and a
    file without an image suffix. Returns the three bad files."""
    folder.mkdir()
    for name in ("a_good.png", "z_good.png"):
        Image.fromarray(np.full((20, 20), 99, np.uint8)).save(folder / name)
    whole = (folder / "a_good.png").read_bytes()
    bad = [folder / "b_truncated.png", folder / "c_text.png", folder / "d_empty.jpg"]
    bad[0].write_bytes(whole[:len(whole) // 2])
    bad[1].write_text("this is not a picture\n")
    bad[2].write_bytes(b"")
    (folder / "notes.txt").write_text("a note")
    return bad


def test_predict_skip_bad_lists_unreadable_files_as_rows_and_goes_on(calibrated, tmp_path):
    import pandas as pd

    from oodscale.predict import PredictRequest, predict

    cfg, layout, run = calibrated
    bad = _hostile_folder(tmp_path / "mine")
    out = tmp_path / "rows.csv"
    summary = predict(cfg, layout, PredictRequest(run, None, str(out), [str(tmp_path / "mine")],
                                                  skip_bad=True))
    rows = pd.read_csv(out)
    assert list(rows.columns) == ["path", "score", "is_ood", "pred", "error"]
    assert len(rows) == 5 and rows["path"].str.endswith("notes.txt").sum() == 0
    errors = rows.set_index(rows["path"].map(lambda p: Path(p).name))["error"]
    assert errors[["a_good.png", "z_good.png"]].isna().all()
    assert rows.loc[rows["error"].isna(), "score"].notna().all()
    assert rows.loc[rows["error"].notna(), "score"].isna().all()
    for path in bad:
        assert str(path) in errors[path.name]
    assert "3 file(s) could not be read" in summary
    assert "1 file(s) without an image suffix, skipped" in summary and "notes.txt" in summary
    assert "2 of 2 images flagged OOD" not in summary  # threshold -1e9: none is OOD
    assert "0 of 2 images flagged OOD" in summary


@pytest.mark.parametrize("which", [0, 1, 2])
def test_predict_without_skip_bad_names_the_file_and_keeps_what_was_scored(calibrated, tmp_path,
                                                                          which):
    import pandas as pd

    from oodscale.data.images import BadImageError
    from oodscale.predict import PredictRequest, predict

    cfg, layout, run = calibrated
    folder = tmp_path / "mine"
    bad = _hostile_folder(folder)[which]
    for other in {"b_truncated.png", "c_text.png", "d_empty.jpg"} - {bad.name}:
        (folder / other).unlink()
    out = tmp_path / "rows.parquet"
    with pytest.raises(BadImageError, match="--skip-bad") as caught:
        predict(cfg, layout, PredictRequest(run, None, str(out), [str(folder)]))
    assert str(bad) in str(caught.value) and "kept in" in str(caught.value)
    assert not out.exists()  # no output that looks finished
    kept = pd.read_parquet(tmp_path / "rows.partial.parquet")
    assert list(kept["path"]) == [str(folder / "a_good.png")]  # scored before the bad file
    assert kept["score"].notna().all()
    assert not list(tmp_path.glob(".rows*"))  # no temp file left


def test_predict_cli_takes_skip_bad(calibrated, tmp_path, capsys):
    cfg, layout, run = calibrated
    bad = _hostile_folder(tmp_path / "mine")
    base = ["predict", CONFIG, f"storage.root={cfg.storage.root}", "--run", run,
            str(tmp_path / "mine"), "--out", str(tmp_path / "rows.csv")]
    assert main(base) == 1
    assert str(bad[0]) in capsys.readouterr().err
    assert main([*base, "--skip-bad"]) == 0
    assert "3 file(s) could not be read" in capsys.readouterr().out


def _tar_of(members: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _png_bytes(value: int = 7) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((10, 10), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _gzip_bomb_named_tar(path: Path, member_mb: int = 8) -> None:
    """A gzip file named .tar whose one member expands to `member_mb` MB of zeros (the issue's
    was 199 KiB expanding to 200 MiB; the reader must refuse it before expanding anything)."""
    import gzip

    members = {"s0.png": _png_bytes(), "s0.json": b"{}", "s1.png": bytes(member_mb << 20)}
    path.write_bytes(gzip.compress(_tar_of(members), compresslevel=9))


def test_gzip_named_tar_is_refused_as_not_a_plain_tar(tmp_path):
    from oodscale.data.shards import ShardError, iter_raw_samples

    _gzip_bomb_named_tar(tmp_path / "x-000000.tar")
    storage = open_storage(str(tmp_path))
    assert (tmp_path / "x-000000.tar").stat().st_size < 64 << 10
    with pytest.raises(ShardError, match=r"x-000000.tar is gzip-compressed, not a plain tar"):
        list(iter_raw_samples(storage, str(tmp_path / "x-000000.tar")))


def test_listed_compressed_shard_is_refused_by_the_checked_path(tmp_path):
    """A crafted manifest listing a gzip with its right sha256 and size: every reader (Ray
    Data's `r|*` one included) goes through the shard check, which refuses it."""
    import hashlib

    from oodscale.data.shards import Manifest, ShardError, ShardInfo, verify_shards, write_manifest

    shard = tmp_path / "test-000000.tar"
    _gzip_bomb_named_tar(shard)
    data = shard.read_bytes()
    storage = open_storage(str(tmp_path))
    write_manifest(storage, str(tmp_path), Manifest(
        kind="ood", split="test", image_size=10, channels=1, class_names=[],
        shards=[ShardInfo(shard.name, 2, hashlib.sha256(data).hexdigest(), len(data))]))
    with pytest.raises(ShardError, match="gzip-compressed, not a plain tar"):
        verify_shards(storage, str(tmp_path))
    with pytest.raises(ShardError, match="gzip-compressed"):
        load_arrays(storage, str(tmp_path))


def test_tar_member_over_the_cap_is_refused_before_it_is_read(tmp_path):
    from oodscale.data.shards import ShardError, iter_raw_samples

    path = tmp_path / "big.tar"
    path.write_bytes(_tar_of({"s0.png": _png_bytes(), "s0.json": b"{}",
                              "s1.png": bytes(3000), "s1.json": b"{}"}))
    storage = open_storage(str(tmp_path))
    with pytest.raises(ShardError, match=r"member s1.png of shard .*big.tar is 0.0 MB, above the "
                                         r"cap .*data.max_image_mb"):
        list(iter_raw_samples(storage, str(path), max_member=2000))
    assert len(list(iter_raw_samples(storage, str(path)))) == 2  # under the default cap


@pytest.mark.parametrize("bad_path", ["../x.tar", "/etc/x.tar", "sub/x.tar", "..", ""])
def test_manifest_shard_path_outside_its_directory_is_refused(tmp_path, bad_path):
    from oodscale.data.shards import ShardError

    (tmp_path / "x.tar").write_bytes(_tar_of({"s0.png": _png_bytes(), "s0.json": b"{}"}))
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "manifest.json").write_text(json.dumps({
        "kind": "ood", "split": "test", "image_size": 10, "channels": 1, "class_names": [],
        "shards": [{"path": bad_path, "count": 1, "sha256": "0" * 64}]}))
    with pytest.raises(ShardError, match="is malformed .*not a plain file name"):
        read_manifest(open_storage(str(tmp_path)), str(tmp_path / "set"))


def _byo_config(tmp_path: Path, shards: Path, *extra: str):
    from oodscale.runtime import layout_for

    cfg = load_config(CONFIG, [f"storage.root={tmp_path / 'runs'}", "data.shard_size=2",
                               *extra], [f"theirs={shards},webdataset"])
    return cfg, layout_for(cfg)


def test_byo_webdataset_set_is_read_through_the_checked_path(tmp_path):
    from oodscale.data.shards import ShardError
    from oodscale.data.sources import prepare_extra_ood

    shards = tmp_path / "theirs"
    shards.mkdir()
    (shards / "a.tar").write_bytes(_tar_of({f"s{i}.png": _png_bytes(i) for i in range(5)}))
    cfg, layout = _byo_config(tmp_path, shards)
    assert prepare_extra_ood(cfg, layout, force=True) == ["ood/theirs (5 images)"]
    images, _ = load_arrays(layout.storage, layout.ood_set("theirs"))
    assert images.shape == (5, 16, 16, 1)
    assert len(read_manifest(layout.storage, layout.ood_set("theirs")).shards) == 3
    _gzip_bomb_named_tar(shards / "b.tar")  # a gzip among them
    with pytest.raises(ShardError, match="b.tar is gzip-compressed, not a plain tar"):
        prepare_extra_ood(cfg, layout, force=True)
    (shards / "b.tar").write_bytes(_tar_of({"t0.png": b"text, not an image"}))
    with pytest.raises(ValueError, match=r"cannot decode image .*b.tar:t0"):
        prepare_extra_ood(cfg, layout, force=True)
    (shards / "b.tar").write_bytes(b"neither gzip nor tar" * 40)
    with pytest.raises(ShardError, match="OOD set theirs: cannot read .*b.tar as a tar"):
        prepare_extra_ood(cfg, layout, force=True)


@pytest.mark.parametrize(("override", "message"), [
    ("generate.num_shards=1000000000", "generate.num_shards: Input should be less than or equal"),
    ("data.shard_size=1.0e+12", "data.shard_size: Input should be less than or equal"),
    ("data.shard_size=1e12", "data.shard_size: Input should be a valid integer"),
    ("diffusion.timesteps=1.0e+12", "diffusion.timesteps: Input should be less than or equal"),
    ("train.lr=inf", "train.lr: Input should be a finite number"),
    ("train.lr=.nan", "train.lr: Input should be a finite number"),
    ("diffusion.lr=-.inf", "diffusion.lr: Input should be a finite number"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("train.seeds=[0,-1]", "train.seeds.1: Input should be greater than or equal to 0"),
    ("train.head_options={arcface: {margin: .inf}}", "train.head_options.arcface.margin: "
                                                     "Input should be a finite number"),
    ("generate.samples_per_shard=1000000", "generate.num_shards x generate.samples_per_shard "
                                           "= 4,000,000 samples"),
])
def test_config_value_too_large_or_not_finite_is_refused_naming_the_key(override, message):
    from oodscale.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(CONFIG, [override, *(["generate.num_shards=1001"]
                                         if "x generate" in message else [])])
    assert message.replace("4,000,000", "1,001,000,000") in str(caught.value)


def test_every_numeric_config_key_has_an_upper_bound():
    """Each int or float field (and each int in a list) has `le`/`lt`; the two free-form
    numeric keys are checked by their validators instead."""
    import typing

    import annotated_types
    from pydantic import BaseModel

    from oodscale.config import ExperimentConfig

    checked_by_validator = {"diffusion.block_out_channels", "train.head_options"}

    def bounded(metadata: list) -> bool:
        return any(isinstance(m, annotated_types.Le | annotated_types.Lt) for m in metadata)

    def numeric(tp) -> list[tuple[type, list]]:
        """(number type, its metadata) inside an annotation: int | None, list[Seed], ..."""
        if typing.get_origin(tp) is typing.Annotated:
            base, *meta = typing.get_args(tp)
            return [(t, m + [x for f in meta for x in getattr(f, "metadata", [f])])
                    for t, m in numeric(base)]
        if tp in (int, float):
            return [(tp, [])]
        return [found for arg in typing.get_args(tp) for found in numeric(arg)]

    unbounded = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            tp = info.annotation
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                walk(tp, f"{key}.")
                continue
            for _, meta in numeric(tp):
                if not bounded(meta + list(info.metadata)) and key not in checked_by_validator:
                    unbounded.append(key)

    walk(ExperimentConfig, "")
    assert unbounded == []
    for config in sorted((REPO / "configs").glob("*.yaml")):  # bounds fit every shipped config
        load_config(config)


def _crafted_card(tmp_path: Path, loss: str = "softmax", **changes) -> Path:
    """A finished classifier whose classifier.json is then altered by `changes`."""
    from oodscale.classify.checkpoints import CARD, classifier_from_card

    card = {"backbone": "smallcnn", "loss": loss, "channels": 1, "image_size": 16,
            "num_classes": 3, "embedding_dim": 8, "head_options": {}, "run": "x",
            "class_names": ["a", "b", "c"]}
    save_classifier(classifier_from_card(card), card, tmp_path)
    (tmp_path / CARD).write_text(json.dumps({**card, **changes}))
    return tmp_path


@pytest.mark.parametrize(("loss", "changes", "message"), [
    # sized far beyond memory: refused by its values, nothing is built
    ("softmax", {"embedding_dim": 10**9}, r"embedding_dim 1000000000 is not an integer in "
                                          r"\[2, 65536\]"),
    # within the bounds but 65536 x 1,000,000 (260 GB): built on the meta device, refused
    ("softmax", {"embedding_dim": 65536, "num_classes": 10**6, "class_names": None},
     r"tensor backbone\.embed\.bias is \(8,\) in model.safetensors but \(65536,\)"),
    # a head that cannot be built on the meta device: its size is checked against the header
    ("sphereface", {"embedding_dim": 65536, "num_classes": 10**6, "class_names": None},
     r"its head \(65536 x 1000000\) is larger than the head weights model.safetensors holds"),
    ("softmax", {"embedding_dim": 16}, r"tensor backbone\..* in the model the card describes"),
    ("arcface", {"num_classes": 5, "class_names": list("abcde")}, r"tensor head\.\S+ is "
                                                                  r"\(8, 3\)"),
    ("softmax", {"backbone": "resnet1000"}, "unknown backbone 'resnet1000'; valid names"),
    ("softmax", {"channels": 3.0}, r"channels 3.0 is not an integer"),
    ("cosface", {"head_options": {"scale": float("inf")}}, "head_options .* are not finite"),
    ("softmax", {"class_names": ["a"]}, r"class_names do not list num_classes \(3\) names"),
])
def test_crafted_classifier_card_is_refused_before_the_model_is_built(tmp_path, loss, changes,
                                                                     message):
    import time

    directory = _crafted_card(tmp_path, loss, **changes)
    started = time.time()
    with pytest.raises(ValueError, match="classifier.json does not describe the weights beside "
                                         "it: " + message) as caught:
        load_classifier(directory)
    assert "rerun `oodscale train`" in str(caught.value)
    assert time.time() - started < 20  # nothing of the card's size was allocated


def test_detector_refuses_a_crafted_card(calibrated):
    from oodscale import Detector
    from oodscale.classify.checkpoints import CARD

    _, layout, run = calibrated
    directory = Path(layout.classifier_dir(run))
    card = json.loads((directory / CARD).read_text())
    (directory / CARD).write_text(json.dumps({**card, "embedding_dim": 4096}))
    with pytest.raises(ValueError, match="classifier.json does not describe the weights"):
        Detector.load(directory)


ODD = "a b#c%41?d"  # a space, a fragment mark, a percent escape and a query mark


def test_predict_reads_and_names_keys_with_odd_characters_on_local_disk(tmp_path, capsys):
    import pandas as pd

    root = tmp_path / f"runs {ODD}"
    hand_calibrated(root)
    folder = tmp_path / f"images {ODD}"
    folder.mkdir()
    for name in (f"{ODD}.png", "plain.png"):
        Image.fromarray(np.full((12, 12), 50, np.uint8)).save(folder / name)
    out = tmp_path / f"rows {ODD}.csv"
    assert main(["predict", CONFIG, f"storage.root={root}", "--run", "x-none-s0", str(folder),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    rows = pd.read_csv(out)
    assert sorted(rows["path"]) == sorted(str(folder / n) for n in (f"{ODD}.png", "plain.png"))
    assert rows["error"].isna().all()


def test_storage_keys_are_carried_as_pairs_never_reparsed(tmp_path):
    """A storage whose URI no parser can open ("mock://"): predict, Detector.load and the
    classifier loader only work if they pass (filesystem, path) pairs and never rebuild and
    parse a URI, as an object-store key with a space, '#', '%' or '?' needs."""
    import pandas as pd
    import pyarrow.fs as pafs

    from oodscale import Detector
    from oodscale.predict import PredictRequest, predict
    from oodscale.runtime import RunLayout, Storage

    bucket = tmp_path / "bucket"
    hand_calibrated(bucket / f"runs {ODD}")
    storage = Storage(fs=pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()),
                      base=f"runs {ODD}", uri=f"mock://bucket/runs {ODD}")
    with pytest.raises(Exception, match="mock"):
        open_storage(storage.uri)  # what a re-parse would run into
    layout = RunLayout(storage, "digits")
    detector = Detector.load(storage.at(layout.classifier_dir("x-none-s0")))
    assert detector.run == "x-none-s0"
    image = bucket / f"{ODD}.png"  # a key of the store, given as a pair
    Image.fromarray(np.full((12, 12), 50, np.uint8)).save(image)
    assert detector.predict([storage.at(f"{ODD}.png")]).score.shape == (1,)
    cfg = load_config(CONFIG, ["evaluate.batch_size=2"])
    out = tmp_path / "rows.parquet"
    predict(cfg, layout, PredictRequest("x-none-s0", None, str(out), [str(image)]))
    assert list(pd.read_parquet(out)["path"]) == [str(image)]


@pytest.mark.integration
def test_predict_with_ray_data_writes_parts_resumes_and_skips_bad_files(calibrated, tmp_path,
                                                                         ray_cluster,
                                                                         monkeypatch):
    import pandas as pd

    import oodscale.predict_listing as predict_listing
    from oodscale.data.images import BadImageError
    from oodscale.predict import PredictRequest, predict

    monkeypatch.setattr(predict_listing, "PART_FILES", 3)
    cfg, layout, run = calibrated
    folder = tmp_path / "mine"
    bad = _hostile_folder(folder)
    for i in range(4):
        Image.fromarray(np.full((9, 9), 20 * i, np.uint8)).save(folder / f"more{i}.png")
    out = tmp_path / "rows"
    request = PredictRequest(run, None, str(out), [str(folder)], skip_bad=True, engine="ray")
    summary = predict(cfg, layout, request)
    assert "3 of 3 part(s) scored now" in summary and "3 file(s) could not be read" in summary
    parts = sorted(out.glob("part-*.parquet"))
    rows = pd.concat([pd.read_parquet(p) for p in parts])
    assert len(parts) == 3 and len(rows) == 9
    assert list(rows.columns) == ["path", "score", "is_ood", "pred", "error"]
    assert sorted(rows.loc[rows["error"].notna(), "path"]) == sorted(map(str, bad))
    assert rows.loc[rows["error"].isna(), "score"].notna().sum() == 6
    assert json.loads((out / "_SUCCESS.json").read_text())["unreadable"] == 3
    local = tmp_path / "local.parquet"  # the single-process path gives the same scores
    predict(cfg, layout, PredictRequest(run, None, str(local), [str(folder)], skip_bad=True,
                                        engine="local"))
    both = rows.merge(pd.read_parquet(local), on="path", suffixes=("", "_local"))
    assert np.allclose(both["score"].dropna(), both["score_local"].dropna(), atol=1e-5)
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[1].unlink()  # an interrupted run: one part missing
    summary = predict(cfg, layout, request)
    assert "1 of 3 part(s) scored now (2 already written)" in summary
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("part-*.parquet"))
            if p.name != parts[1].name} == {k: v for k, v in stamps.items()
                                           if k != parts[1].name}
    again = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*"))])
    pd.testing.assert_frame_equal(again.reset_index(drop=True), rows.reset_index(drop=True),
                                  check_exact=False, atol=1e-5)
    for p in out.glob("part-*"):
        p.unlink()
    with pytest.raises(BadImageError, match="rerun resumes from them"):
        predict(cfg, layout, PredictRequest(run, None, str(out), [str(folder)], engine="ray"))


@pytest.mark.integration
def test_predict_with_ray_lists_subtrees_in_tasks_link_safe_and_resumes(calibrated, tmp_path,
                                                                          monkeypatch):
    """Ray tasks walk a nested folder with a loop and links out of it as the driver's walk
    does; a rerun after a part went missing scores only that part and ends with the rows of
    the single-process path."""
    import pandas as pd

    import oodscale.predict_listing as predict_listing
    from oodscale.errors import InputError
    from oodscale.predict import PredictRequest, predict

    monkeypatch.setattr(predict_listing, "PART_FILES", 2)
    cfg, layout, run = calibrated
    tree, _ = _linked_tree(tmp_path)
    (tree / "sub" / "deep").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(tree / "sub" / "deep" /
                                                                   f"d{i}.png")
    (tree / "sub" / "deep" / "top").symlink_to(tree)  # a loop from two levels down
    (tree / "notes.txt").write_text("not an image")
    local = tmp_path / "local.parquet"
    predict(cfg, layout, PredictRequest(run, None, str(local), [str(tree)], engine="local"))
    expected = pd.read_parquet(local).sort_values("path").reset_index(drop=True)
    assert len(expected) == 7 and not any("out/" in p or "up/" in p for p in expected["path"])
    out = tmp_path / "rows"
    request = PredictRequest(run, None, str(out), [str(tree)], engine="ray")
    summary = predict(cfg, layout, request)
    parts = sorted(out.glob("part-*.parquet"))
    # the folder's own files (a.png, again.png: one part) and sub/ (5 files: three parts)
    assert "4 of 4 part(s) scored now" in summary and len(parts) == 4
    assert "5 file(s) links not followed" in summary and "1 file(s) without an image" in summary

    def rows() -> pd.DataFrame:
        found = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))])
        return found.sort_values("path").reset_index(drop=True)

    pd.testing.assert_frame_equal(rows(), expected, check_exact=False, atol=1e-5)
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[2].unlink()  # an interrupted run: one part of the subtree missing
    assert "1 of 4 part(s) scored now (3 already written)" in predict(cfg, layout, request)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")
            if p.name != parts[2].name} == {k: v for k, v in stamps.items()
                                           if k != parts[2].name}
    pd.testing.assert_frame_equal(rows(), expected, check_exact=False, atol=1e-5)
    assert json.loads((out / "_SUCCESS.json").read_text())["files"] == 7
    (out / "part-000000.parquet").write_bytes(b"")  # a part named as before 2026-12-04
    with pytest.raises(InputError, match="parts named as before 2026-12-04"):
        predict(cfg, layout, request)


def test_unreadable_image_errors_say_why_in_words(tmp_path):
    from oodscale.data.images import BadImageError
    from oodscale.detector import training_images

    bad = _hostile_folder(tmp_path / "mine")
    for path, why in zip(bad, ["", "not an image of a format read here", "the file is empty"],
                         strict=True):
        with pytest.raises(BadImageError, match=f"cannot decode image {path}: {why}") as caught:
            training_images([path], 16, 1)
        assert "BytesIO" not in str(caught.value)


def test_predict_reads_keys_with_odd_characters_on_s3(s3_server, tmp_path):
    """Object-store keys with a space, '#', '%41' and '?' on a real S3-compatible server: the
    classifier and the images are read through (filesystem, key) pairs, never a rebuilt URI
    (which pyarrow would refuse, cut at '#', or decode '%41' as 'A')."""
    import pandas as pd
    import pyarrow.fs as pafs

    from oodscale.predict import PredictRequest, predict
    from oodscale.runtime import layout_for

    root = s3_server("oddkeys")
    storage = open_storage(root)
    hand_calibrated(tmp_path / "local")
    pafs.copy_files(str(tmp_path / "local"), storage.base,
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=storage.fs)
    names = [f"{ODD}.png", "plain.png"]
    for name in names:
        with storage.fs.open_output_stream(storage.path("images", name)) as f:
            f.write(_png_bytes(60))
    cfg = load_config(CONFIG, [f"storage.root={root}"])
    out = tmp_path / "rows.csv"
    folder = root.replace("/root?", "/root/images?")
    summary = predict(cfg, layout_for(cfg), PredictRequest("x-none-s0", None, str(out),
                                                           [folder]))
    rows = pd.read_csv(out)
    assert sorted(rows["path"]) == sorted(storage.uri_of(storage.path("images", n))
                                          for n in names)
    assert rows["error"].isna().all() and rows["score"].notna().all(), summary
