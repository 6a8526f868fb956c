"""WebDataset shards with a manifest: the one data contract every stage reads and writes.

A shard is `<prefix>-%06d.tar` holding samples `__key__`, `png` (uint8 image) and `json`
(ID: {"label": k}; synthetic: provenance). `manifest.json` beside the shards is written last
and atomically, so a shard that the manifest does not list does not exist for readers.
Tar headers carry fixed metadata (mtime 0), so the same samples give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from oodscale.runtime import Storage

MANIFEST = "manifest.json"
Kind = Literal["id", "ood", "synthetic"]


class ShardError(RuntimeError):
    """Missing, corrupt or inconsistent shard data; the message says which file and what to do."""


@dataclass
class ShardInfo:
    path: str  # file name relative to the manifest's directory
    count: int
    sha256: str


@dataclass
class Manifest:
    kind: Kind
    split: str
    image_size: int
    channels: int
    class_names: list[str]
    shards: list[ShardInfo] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        raw["shards"] = [ShardInfo(**s) for s in raw.get("shards", [])]
        return cls(**raw)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 H×W or H×W×C image (PNG is lossless and byte-deterministic)."""
    if image.dtype != np.uint8:
        raise ShardError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 H×W×C array from PNG bytes (C=1 for gray)."""
    arr = np.asarray(Image.open(io.BytesIO(data)))
    return arr[:, :, None] if arr.ndim == 2 else arr


def tar_bytes(samples: Iterable[tuple[str, np.ndarray, dict[str, Any]]]) -> tuple[bytes, int]:
    """Serialise (key, image, meta) samples to deterministic tar bytes; returns (bytes, count)."""
    buf = io.BytesIO()
    count = 0
    with wds.TarWriter(buf, user="oodscale", group="oodscale", mtime=0.0, encoder=False) as tw:
        for key, image, meta in samples:
            if "." in key:
                raise ShardError(f"sample key {key!r} contains a dot; WebDataset keys must not")
            tw.write({"__key__": key, "png": encode_png(image),
                      "json": json.dumps(meta, sort_keys=True).encode()})
            count += 1
    return buf.getvalue(), count


def write_shard(storage: Storage, directory: str, name: str,
                samples: Iterable[tuple[str, np.ndarray, dict[str, Any]]]) -> ShardInfo:
    """Write one shard atomically and return its manifest entry."""
    data, count = tar_bytes(samples)
    storage.write_bytes_atomic(f"{directory}/{name}", data)
    return ShardInfo(path=name, count=count, sha256=hashlib.sha256(data).hexdigest())


def write_manifest(storage: Storage, directory: str, manifest: Manifest) -> None:
    storage.write_bytes_atomic(f"{directory}/{MANIFEST}", manifest.to_json().encode())


def read_manifest(storage: Storage, directory: str,
                  hint: str = "run `oodscale prepare`") -> Manifest:
    """The manifest of a shard directory; a missing or malformed one is a clear error."""
    path = f"{directory}/{MANIFEST}"
    if not storage.exists(path):
        raise ShardError(f"no {MANIFEST} in {storage.uri_of(directory)}: the stage that writes it "
                         f"has not finished; {hint} first")
    try:
        return Manifest.from_json(storage.read_bytes(path).decode())
    except (ValueError, TypeError, KeyError) as err:
        raise ShardError(f"{storage.uri_of(path)} is malformed ({err}); delete the directory and "
                         f"rerun the stage that writes it") from None


def try_read_manifest(storage: Storage, directory: str) -> Manifest | None:
    return read_manifest(storage, directory) if storage.exists(f"{directory}/{MANIFEST}") else None


def shard_paths(storage: Storage, directory: str, manifest: Manifest) -> list[str]:
    """Filesystem paths of the listed shards, checking each exists."""
    paths = [f"{directory}/{s.path}" for s in manifest.shards]
    missing = [p for p in paths if not storage.exists(p)]
    if missing:
        raise ShardError(f"{len(missing)} shard(s) listed in {directory}/{MANIFEST} are missing, "
                         f"e.g. {missing[0]}; rerun the stage that wrote them")
    return paths


def verify_shards(storage: Storage, directory: str) -> Manifest:
    """Check every listed shard against its sha256; raise naming the first corrupt one."""
    manifest = read_manifest(storage, directory)
    for info in manifest.shards:
        path = f"{directory}/{info.path}"
        if not storage.exists(path):
            raise ShardError(f"shard {path} is missing; rerun the stage that wrote it")
        digest = hashlib.sha256(storage.read_bytes(path)).hexdigest()
        if digest != info.sha256:
            raise ShardError(f"shard {path} is corrupt (sha256 {digest[:12]}… != manifest "
                             f"{info.sha256[:12]}…); delete it and its manifest entry and rerun")
    return manifest


def iter_raw_samples(storage: Storage, path: str) -> Iterator[dict[str, Any]]:
    """Undecoded WebDataset samples ({"__key__", extension: bytes, ...}) of one tar."""
    stream = io.BytesIO(storage.read_bytes(path))
    files = ({**f, "__url__": path} for f in tar_file_iterator(stream))
    yield from group_by_keys(files)


def iter_samples(storage: Storage, path: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """Decoded (key, image H×W×C uint8, meta) samples of one shard, read in-process."""
    try:
        for sample in iter_raw_samples(storage, path):
            yield sample["__key__"], decode_png(sample["png"]), json.loads(sample["json"])
    except Exception as err:  # tarfile, PIL and json all raise their own types
        raise ShardError(f"cannot read shard {path}: {err}; verify with `oodscale verify`") from err


def load_arrays(storage: Storage, directory: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """All images (N×H×W×C uint8) and metas of a small shard set; for grids, tests, evaluation."""
    manifest = read_manifest(storage, directory)
    images, metas = [], []
    for path in shard_paths(storage, directory, manifest):
        for _, image, meta in iter_samples(storage, path):
            images.append(image)
            metas.append(meta)
    if not images:
        shape = (0, manifest.image_size, manifest.image_size, manifest.channels)
        return np.zeros(shape, np.uint8), []
    return np.stack(images), metas


def write_split(storage: Storage, directory: str, prefix: str, images: np.ndarray,
                metas: list[dict[str, Any]], shard_size: int, manifest: Manifest) -> Manifest:
    """Write in-memory images as shards of `shard_size`, then the manifest (last)."""
    if len(images) != len(metas):
        raise ShardError(f"{len(images)} images but {len(metas)} metadata records")
    storage.makedirs(directory)
    manifest.shards = []
    for index, start in enumerate(range(0, len(images), shard_size)):
        chunk = range(start, min(start + shard_size, len(images)))
        samples = ((f"{prefix}_{i:08d}", images[i], metas[i]) for i in chunk)
        manifest.shards.append(write_shard(storage, directory, shard_name(prefix, index), samples))
    write_manifest(storage, directory, manifest)
    return manifest
