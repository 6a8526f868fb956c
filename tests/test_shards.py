import hashlib

import numpy as np
import pytest

from oodscale.data.shards import (
    MANIFEST,
    Manifest,
    ShardError,
    load_arrays,
    read_manifest,
    tar_bytes,
    verify_shards,
    write_manifest,
    write_split,
)
from oodscale.runtime import Storage, StorageError, open_storage


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def _manifest():
    return Manifest(kind="id", split="train", image_size=8, channels=1, class_names=["a", "b"])


def test_roundtrip_and_checksums(tmp_path):
    storage = open_storage(str(tmp_path))
    images = _images(10)
    metas = [{"label": i % 2} for i in range(10)]
    manifest = write_split(storage, storage.path("d"), "train", images, metas, 4, _manifest())
    assert [s.count for s in manifest.shards] == [4, 4, 2]
    assert [s.path for s in manifest.shards] == [f"train-00000{i}.tar" for i in range(3)]
    for s in manifest.shards:
        assert hashlib.sha256((tmp_path / "d" / s.path).read_bytes()).hexdigest() == s.sha256
    back, back_metas = load_arrays(storage, storage.path("d"))
    assert np.array_equal(back, images) and back_metas == metas


def test_tar_bytes_are_deterministic():
    samples = [("k_0", _images(1)[0], {"label": 1})]
    first, _ = tar_bytes(samples)
    second, _ = tar_bytes(samples)
    assert first == second


def test_keys_with_dots_are_refused():
    with pytest.raises(ShardError, match="dot"):
        tar_bytes([("a.b", _images(1)[0], {})])


class _CrashBeforeRename:
    """A filesystem that dies between writing the temp file and renaming it into place."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def move(self, src, dst):
        raise OSError("simulated crash before rename")


def test_manifest_write_is_atomic(tmp_path):
    """A rewrite that dies mid-way leaves the previous manifest intact and readable."""
    storage = open_storage(str(tmp_path))
    directory = storage.path("d")
    storage.makedirs(directory)
    write_manifest(storage, directory, _manifest())
    before = (tmp_path / "d" / MANIFEST).read_bytes()
    crashing = Storage(fs=_CrashBeforeRename(storage.fs), base=storage.base, uri=storage.uri)
    changed = _manifest()
    changed.class_names = ["x", "y", "z"]
    with pytest.raises(StorageError, match="simulated crash"):
        write_manifest(crashing, directory, changed)
    assert (tmp_path / "d" / MANIFEST).read_bytes() == before
    assert read_manifest(storage, directory).class_names == ["a", "b"]
    # the failed write removed its temp file (a killed process leaves one; readers ignore it)
    assert [p.name for p in (tmp_path / "d").iterdir()] == [MANIFEST]


def test_reader_never_sees_a_shard_without_manifest(tmp_path):
    storage = open_storage(str(tmp_path))
    directory = storage.path("d")
    storage.makedirs(directory)
    (tmp_path / "d" / "train-000000.tar").write_bytes(tar_bytes([("k", _images(1)[0], {})])[0])
    with pytest.raises(ShardError, match="has not finished"):
        read_manifest(storage, directory)


def test_corrupt_shard_is_named(tmp_path):
    storage = open_storage(str(tmp_path))
    write_split(storage, storage.path("d"), "train", _images(4), [{"label": 0}] * 4, 4,
                _manifest())
    shard = tmp_path / "d" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-000000.tar is corrupt"):
        verify_shards(storage, storage.path("d"))


def test_malformed_manifest_is_a_clear_error(tmp_path):
    storage = open_storage(str(tmp_path))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match="malformed"):
        read_manifest(storage, storage.path("d"))
