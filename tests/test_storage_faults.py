"""A full or read-only storage root fails the stage with a named error; finished files stay.

The injected-error tests run everywhere. The filesystem tests mount a real size-limited tmpfs
(and remount it read-only), so they need root and `mount`; elsewhere they are skipped.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodscale.cli import main
from oodscale.data.shards import MANIFEST, Manifest, read_manifest, write_manifest
from oodscale.runtime import Storage, StorageError, open_storage
from tests.support import CONFIG, imagefolder


class _FullDisk:
    """A filesystem whose writes fail as a full disk does."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open_output_stream(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)


def test_injected_write_error_is_named_and_keeps_the_old_file(tmp_path):
    storage = open_storage(str(tmp_path))
    directory = storage.path("d")
    write_manifest(storage, directory, Manifest(kind="id", split="train", image_size=8,
                                                channels=1, class_names=["a"]))
    before = (tmp_path / "d" / MANIFEST).read_bytes()
    full = Storage(fs=_FullDisk(storage.fs), base=storage.base, uri=storage.uri)
    with pytest.raises(StorageError, match=r"cannot write .*manifest.json.*No space left"):
        write_manifest(full, directory, Manifest(kind="id", split="train", image_size=8,
                                                 channels=1, class_names=["a", "b"]))
    assert (tmp_path / "d" / MANIFEST).read_bytes() == before
    assert [p.name for p in (tmp_path / "d").iterdir()] == [MANIFEST]


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """A real 8 MB tmpfs: fills up like a full disk, remounts read-only like a read-only one."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)):
        pytest.skip("needs root and mount to build a size-limited filesystem")
    yield mount_point
    _mount("-o", "remount,rw", str(mount_point))
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _fill(mount_point: Path, leave: int) -> Path:
    """Fill the filesystem, then give back `leave` bytes."""
    ballast = mount_point / "ballast"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with open(ballast, "r+b") as f:
        f.truncate(ballast.stat().st_size - leave)
    return ballast


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "ballast"}


@pytest.mark.integration
def test_full_root_fails_the_stage_and_keeps_finished_sets(small_fs, ray_cluster, capsys):
    base = [f"storage.root={small_fs}", "data.ood_samples=40"]
    assert main(["prepare", CONFIG, *base, "data.ood_sets=[gaussian]"]) == 0
    finished = _snapshot(small_fs)
    ballast = _fill(small_fs, leave=8192)
    capsys.readouterr()
    assert main(["prepare", CONFIG, *base, "data.ood_sets=[gaussian,textures]"]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "textures" in err and "No space left" in err
    assert _snapshot(small_fs) == finished  # nothing finished changed, no temp file left
    assert main(["verify", CONFIG, *base, "data.ood_sets=[gaussian]"]) == 0
    ballast.unlink()
    assert main(["prepare", CONFIG, *base, "data.ood_sets=[gaussian,textures]"]) == 0
    assert "wrote ood/textures (40 images)" in capsys.readouterr().out  # only what was missing


@pytest.mark.integration
def test_full_root_in_a_ray_worker_is_named(small_fs, tmp_path, ray_cluster, capsys):
    """The same error from a Ray Data actor (ImageFolder shards are written by workers)."""
    data = tmp_path / "images" / "train"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(20):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / label / f"{i}.png")
    _fill(small_fs, leave=8192)
    assert main(["prepare", CONFIG, f"storage.root={small_fs}", *imagefolder(data.parent, 32),
                 "data.shard_size=10", "data.ood_sets=[gaussian]"]) == 1
    err = capsys.readouterr().err
    ours = err[err.index("oodscale prepare: error: "):]  # after Ray Data's own log lines
    assert "cannot write" in ours and "No space left" in ours
    assert not list(small_fs.rglob("*.tmp-*"))


@pytest.mark.integration
def test_read_only_root_fails_with_a_named_error(small_fs, ray_cluster, capsys):
    base = [f"storage.root={small_fs}", "data.ood_sets=[gaussian]", "data.ood_samples=40"]
    assert main(["prepare", CONFIG, *base]) == 0
    finished = _snapshot(small_fs)
    assert _mount("-o", "remount,ro", str(small_fs))
    capsys.readouterr()
    assert main(["train", CONFIG, *base, "train.outliers=[none]"]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "Read-only file system" in err
    assert main(["verify", CONFIG, *base]) == 0  # reading still works
    assert _snapshot(small_fs) == finished
    storage = open_storage(str(small_fs))
    assert read_manifest(storage, storage.path("digits", "data", "id", "train")).num_samples
