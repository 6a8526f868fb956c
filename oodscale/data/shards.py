"""WebDataset shards with a manifest: the one data contract every stage reads and writes.

A shard is `<prefix>-%06d.tar` holding samples `__key__`, `png` or `jpg` (image) and `json`
(ID: {"label": k}; synthetic: provenance). `manifest.json` beside the shards is written last
and atomically, so a shard that the manifest does not list does not exist for readers.
Tar headers carry fixed metadata (mtime 0), so the same samples give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from oodscale.data.images import DEFAULT_LIMITS, SHARD_FORMATS, open_image
from oodscale.errors import InputError, UserError
from oodscale.runtime import Storage

MANIFEST = "manifest.json"
Kind = Literal["id", "ood", "synthetic"]
_HASH_CHUNK = 8 << 20


class ShardError(UserError, RuntimeError):
    """Missing, corrupt or inconsistent shard data; the message says which file and what to do."""


@dataclass
class ShardInfo:
    path: str  # file name relative to the manifest's directory
    count: int
    sha256: str
    size: int | None = None  # bytes; None in manifests written before sizes were recorded

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ShardInfo:
        """The entry a Ray Data shard writer returned as a row (`path`, `count`, `sha256`,
        `size`)."""
        return cls(path=str(row["path"]), count=int(row["count"]), sha256=str(row["sha256"]),
                   size=int(row["size"]))


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
        for shard in raw["shards"]:
            plain_shard_name(shard.path)
        return cls(**raw)


def plain_shard_name(path: Any) -> str:
    """A manifest's shard `path`: a plain file name in the manifest's own directory, never a
    path that leads elsewhere (`../x.tar`, `/abs/x.tar`, `sub/x.tar`)."""
    if (not isinstance(path, str) or path in ("", ".", "..")
            or any(c in path for c in "/\\\x00")):
        raise InputError(f"shard path {path!r} is not a plain file name in the manifest's "
                         f"directory")
    return path


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


def decode_png(data: bytes, source: str = "in a shard") -> np.ndarray:
    """uint8 H×W×C array from PNG (or JPEG) bytes (C=1 for gray), through the checked opener
    (size and pixel caps, shard formats only)."""
    arr = np.asarray(open_image(data, source, formats=SHARD_FORMATS))
    return arr[:, :, None] if arr.ndim == 2 else arr


IMAGE_FORMATS = ("png", "jpg")  # the member an image is stored as; every reader takes either


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 90) -> bytes:
    """`png` (lossless) or `jpg` bytes (at `quality`: 10x smaller for 224x224 photos, which is
    what ImageNet-scale synthetic sets need); both byte-deterministic for the same input."""
    if image_format == "png":
        return encode_png(image)
    if image_format != "jpg":
        raise ShardError(f"unknown image format {image_format!r}; valid: {IMAGE_FORMATS}")
    if image.dtype != np.uint8:
        raise ShardError(f"images must be uint8, got {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(
        buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_image(sample: dict[str, Any]) -> np.ndarray:
    """The uint8 H×W×C image of a raw tar sample, whichever format it was stored in."""
    for image_format in IMAGE_FORMATS:
        if image_format in sample:
            # PIL reads either from the bytes
            return decode_png(sample[image_format], f"{sample.get('__key__')!r}")
    raise ShardError(f"sample {sample.get('__key__')!r} has no image member "
                     f"({' or '.join(IMAGE_FORMATS)})")


def tar_bytes(samples: Iterable[tuple[str, np.ndarray, dict[str, Any]]],
              image_format: str = "png", quality: int = 90) -> tuple[bytes, int]:
    """Serialise (key, image, meta) samples to deterministic tar bytes; returns (bytes, count)."""
    import webdataset as wds  # here, not at the top: reading manifests stays light (status)

    buf = io.BytesIO()
    count = 0
    with wds.TarWriter(buf, user="oodscale", group="oodscale", mtime=0.0, encoder=False) as tw:
        for key, image, meta in samples:
            if "." in key:
                raise ShardError(f"sample key {key!r} contains a dot; WebDataset keys must not")
            tw.write({"__key__": key, image_format: encode_image(image, image_format, quality),
                      "json": json.dumps(meta, sort_keys=True).encode()})
            count += 1
    return buf.getvalue(), count


def write_shard(storage: Storage, directory: str, name: str,
                samples: Iterable[tuple[str, np.ndarray, dict[str, Any]]],
                image_format: str = "png", quality: int = 90) -> ShardInfo:
    """Write one shard atomically and return its manifest entry."""
    data, count = tar_bytes(samples, image_format, quality)
    storage.write_bytes_atomic(f"{directory}/{name}", data)
    return ShardInfo(path=name, count=count, sha256=hashlib.sha256(data).hexdigest(),
                     size=len(data))


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


def shard_problem(storage: Storage, directory: str, info: ShardInfo) -> str | None:
    """What is wrong with a listed shard (missing, size or sha256 not the manifest's), or None.

    The size is a stat; the checksum reads the file once, in chunks.
    """
    path = f"{directory}/{info.path}"
    found = storage.fs.get_file_info(path)
    if found.type == pafs.FileType.NotFound:
        return (f"shard {storage.uri_of(path)} listed in {MANIFEST} is missing; rerun the stage "
                f"that wrote it")
    if info.size is not None and found.size != info.size:
        return (f"shard {storage.uri_of(path)} is corrupt (size {found.size} bytes != manifest "
                f"{info.size}); delete it and its manifest entry and rerun")
    digest, head = hashlib.sha256(), None
    with storage.fs.open_input_stream(path) as stream:
        while chunk := stream.read(_HASH_CHUNK):
            head = chunk[:8] if head is None else head
            digest.update(chunk)
    if digest.hexdigest() != info.sha256:
        return (f"shard {storage.uri_of(path)} is corrupt (sha256 {digest.hexdigest()[:12]}… != "
                f"manifest {info.sha256[:12]}…); delete it and its manifest entry and rerun")
    compression = compression_of(head or b"")  # Ray Data's reader would expand it ("r|*")
    return _not_plain(storage, path, compression) if compression else None


def damaged_shards(storage: Storage, directory: str, shards: list[ShardInfo],
                   ) -> list[tuple[ShardInfo, str]]:
    """Every listed shard that fails its check, with the reason; checked in parallel threads
    (hashlib and pyarrow reads release the GIL, and object stores answer faster in parallel)."""
    if not shards:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
        problems = list(pool.map(lambda s: shard_problem(storage, directory, s), shards))
    return [(s, p) for s, p in zip(shards, problems, strict=True) if p is not None]


_CHECKED: set[tuple[str, str, int, int]] = set()  # shards this process checked, as they were


def shard_paths(storage: Storage, directory: str, manifest: Manifest) -> list[str]:
    """Paths of the listed shards, each checked against its manifest size and sha256 once per
    process (again only if the file changed since): every reader goes through here, so a
    damaged shard is refused with the error `oodscale verify` gives, not decoded into training.
    """
    paths = [f"{directory}/{s.path}" for s in manifest.shards]
    stats = storage.fs.get_file_info(paths)
    keys = [(p, s.sha256, st.size or -1, st.mtime_ns or -1)
            for p, s, st in zip(paths, manifest.shards, stats, strict=True)]
    unchecked = [s for s, key in zip(manifest.shards, keys, strict=True) if key not in _CHECKED]
    _raise_first(damaged_shards(storage, directory, unchecked))
    _CHECKED.update(keys)
    return paths


def verify_shards(storage: Storage, directory: str) -> Manifest:
    """Check every listed shard's size and sha256; raise naming the first damaged one."""
    manifest = read_manifest(storage, directory)
    _raise_first(damaged_shards(storage, directory, manifest.shards))
    return manifest


def drop_damaged(storage: Storage, directory: str, manifest: Manifest) -> list[str]:
    """Remove the damaged shards from `manifest` (in memory), for a writer that redraws them;
    returns what was wrong with each."""
    damaged = damaged_shards(storage, directory, manifest.shards)
    bad = {info.path for info, _ in damaged}
    manifest.shards = [s for s in manifest.shards if s.path not in bad]
    return [problem for _, problem in damaged]


def _raise_first(damaged: list[tuple[ShardInfo, str]]) -> None:
    if damaged:
        more = f" ({len(damaged) - 1} more damaged shard(s) beside it)" if len(damaged) > 1 else ""
        raise ShardError(damaged[0][1] + more)


# The first bytes of the compressed formats `tarfile`'s "r|*" would silently expand.
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
                     b"\x28\xb5\x2f\xfd": "zstd", b"\x04\x22\x4d\x18": "lz4"}
MAX_MEMBER_BYTES = DEFAULT_LIMITS.max_bytes  # a tar member larger than this is not read


def compression_of(head: bytes) -> str | None:
    """The compression a file starting with `head` is in (gzip, ...), None for none."""
    return next((name for magic, name in COMPRESSION_MAGIC.items() if head.startswith(magic)),
                None)


def _not_plain(storage: Storage, path: str, compression: str) -> str:
    return (f"shard {storage.uri_of(path)} is {compression}-compressed, not a plain tar: "
            f"oodscale reads uncompressed WebDataset tars only (a compressed member can expand "
            f"far beyond the file); decompress it (e.g. `gunzip -c x.tar.gz > x.tar`)")


class _Rejoined:
    """A read-only stream whose first bytes were read ahead (to check them) and are given back."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:size], self.head[size:]
        return out + (self.stream.read(size - len(out)) if len(out) < size else b"")


def _tar_members(storage: Storage, path: str, max_member: int) -> Iterator[dict[str, Any]]:
    """{"fname", "data", "__url__"} of each regular file of a plain (uncompressed) tar,
    streamed; a compressed file or a member above `max_member` bytes is a ShardError before
    anything is expanded or read."""
    with storage.fs.open_input_stream(path) as raw:
        head = raw.read(8)
        compression = compression_of(head)
        if compression:
            raise ShardError(_not_plain(storage, path, compression))
        with tarfile.open(fileobj=_Rejoined(head, raw), mode="r|") as archive:
            for member in archive:
                archive.members = []  # a stream's TarInfo list would grow with every member
                if not member.isfile() or member.name.startswith("__"):
                    continue  # directories and links (never followed), WebDataset's __meta__
                if member.size > max_member:
                    raise ShardError(
                        f"member {member.name} of shard {storage.uri_of(path)} is "
                        f"{member.size / 2**20:.1f} MB, above the cap of "
                        f"{max_member / 2**20:.1f} MB for one sample file (data.max_image_mb)")
                handle = archive.extractfile(member)
                yield {"fname": member.name, "data": handle.read() if handle else b"",
                       "__url__": path}


def iter_raw_samples(storage: Storage, path: str,
                     max_member: int = MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Undecoded WebDataset samples ({"__key__", extension: bytes, ...}) of one plain tar."""
    from webdataset.tariterators import group_by_keys

    yield from group_by_keys(_tar_members(storage, path, max_member))


def iter_samples(storage: Storage, path: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """Decoded (key, image H×W×C uint8, meta) samples of one shard, read in-process."""
    try:
        for sample in iter_raw_samples(storage, path):
            yield sample["__key__"], sample_image(sample), json.loads(sample["json"])
    except Exception as err:  # tarfile, PIL and json all raise their own types
        raise unreadable_shard(storage, path, err) from err


def unreadable_shard(storage: Storage, path: str, err: Exception) -> ShardError:
    """The error of a listed shard that cannot be read or decoded."""
    return ShardError(f"cannot read shard {storage.uri_of(path)}: {err}; verify with "
                      "`oodscale verify`")


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
