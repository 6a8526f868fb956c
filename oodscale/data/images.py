"""Image files from users: listing folders without leaving them, and opening files with caps.

Before a byte is decoded, a file is checked against a size cap (`data.max_image_mb`), its header
against a pixel cap (`data.max_image_megapixels`); Pillow's decompression-bomb warning is an
error here, and only the formats the project reads are opened (`formats=`), so a file named
.png is never handed to one of Pillow's other decoders.

Every folder walk (prepare's ImageFolder, `--ood` folders, `oodscale predict`, bring-your-own
WebDataset sets) goes through `iter_folder` (`list_folder` sorts what it finds;
`list_first_level` splits a folder into the subtrees `predict --engine ray` walks in tasks).
On local disk it does not follow a link to a directory (a `sub/up -> ..` loop would list the
tree again and again) and takes a link to a file only when the file lies inside the tree; what
it leaves out is listed, never silently dropped. Object stores have no links: pyarrow's recursive
listing is used there as it is.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from oodscale.errors import InputError, MissingError
from oodscale.runtime import Storage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
USER_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "PPM", "TIFF")  # Pillow's names of the suffixes
SHARD_FORMATS = ("PNG", "JPEG")  # what shards store (shards.IMAGE_FORMATS)

# Pillow only warns between MAX_IMAGE_PIXELS and twice that; here the warning is an error. The
# filter is set around each open under a lock: warnings.catch_warnings is process-wide state,
# and predict opens images in threads (the open reads the header only, so the lock is cheap).
_OPEN_LOCK = threading.Lock()


class BadImageError(InputError):
    """An image file that is not read: too large, an unsupported format or undecodable."""


@dataclass(frozen=True)
class ImageLimits:
    """The caps checked before decoding (defaults: those of `data.max_image_mb` and
    `data.max_image_megapixels`)."""

    max_bytes: int = 64 << 20
    max_pixels: int = 40_000_000

    @classmethod
    def from_config(cls, data: Any) -> ImageLimits:
        """The caps of a config's `data` section."""
        return cls(max_bytes=int(data.max_image_mb * 2**20),
                   max_pixels=int(data.max_image_megapixels * 1e6))


DEFAULT_LIMITS = ImageLimits()


def _too_big(source: str, size: int, limits: ImageLimits) -> BadImageError:
    return BadImageError(f"image {source} is {size / 2**20:.1f} MB, above the cap of "
                         f"{limits.max_bytes / 2**20:.1f} MB (data.max_image_mb); remove it, "
                         f"shrink it, or raise the cap")


def read_image_bytes(storage: Storage, path: str, limits: ImageLimits = DEFAULT_LIMITS,
                     source: str | None = None) -> bytes:
    """The bytes of one image file, its size checked before it is read (and while reading, in
    case the listing's size was stale)."""
    source = source or storage.uri_of(path)
    info = storage.fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise MissingError(f"image {source} not found")
    if info.size is not None and info.size > limits.max_bytes:
        raise _too_big(source, info.size, limits)
    with storage.fs.open_input_stream(path) as stream:
        data = stream.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise _too_big(source, len(data), limits)
    return data


def open_image(data: bytes, source: str, limits: ImageLimits = DEFAULT_LIMITS,
               formats: tuple[str, ...] = USER_FORMATS) -> Image.Image:
    """A PIL image from file bytes, header read and checked, pixels decoded on first use."""
    if len(data) > limits.max_bytes:
        raise _too_big(source, len(data), limits)
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadImageError(f"image {source} is refused as a decompression bomb ({err}); "
                            f"remove or replace it") from None
    except Exception as err:  # PIL raises many types for bad files
        why = ("the file is empty" if not data else
               "not an image of a format read here" if isinstance(err, UnidentifiedImageError)
               else str(err))  # Pillow's own message names an in-memory buffer, not the file
        raise BadImageError(f"cannot decode image {source}: {why} (formats read: "
                            f"{', '.join(formats)}); remove or replace it") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise BadImageError(f"image {source} is {width}x{height} ({width * height / 1e6:.1f} "
                            f"megapixels), above the cap of {limits.max_pixels / 1e6:g} "
                            f"(data.max_image_megapixels); remove it, shrink it, or raise the "
                            f"cap")
    return image


def decode_to_size(data: bytes, size: int, channels: int, source: str,
                   limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """size×size×channels uint8 from a user's image file bytes, checked (`open_image`) first,
    then converted to gray or RGB and resized bilinearly (as `builtin.resize`, so as prepare
    made the training shards). Imports neither torch nor scipy: Ray Data decode tasks use it."""
    opened = open_image(data, source, limits)
    mode = "L" if channels == 1 else "RGB"
    try:
        converted = opened.convert(mode)
    except Exception as err:  # PIL raises many types for bad files
        raise BadImageError(f"cannot decode image {source}: {err}; remove or replace "
                            f"it") from None
    out = np.asarray(converted.resize((size, size), Image.Resampling.BILINEAR))
    return out[:, :, None] if out.ndim == 2 else out


@dataclass
class FolderListing:
    """The files under a folder, sorted: those with a wanted suffix, the others, and the links
    not followed (a link to a directory, or to a file outside the tree, or a dangling one)."""

    files: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def skipped(self, limit: int = 5) -> list[str]:
        """Lines saying what the listing left out, for a summary (empty when nothing was)."""
        return skipped_lines({"others": len(self.others), "links": len(self.links)},
                             {"others": self.others, "links": self.links}, limit)


SKIPPED = {"others": "without an image suffix",
           "links": "links not followed (a directory, or outside the folder)"}


def skipped_lines(counts: dict[str, int], examples: dict[str, list[str]],
                  limit: int = 5) -> list[str]:
    """Lines saying what a listing left out: per kind of `SKIPPED` its count and its first
    `limit` paths (counts and examples apart, so listings walked in tasks can be summed)."""
    lines = []
    for kind, what in SKIPPED.items():
        if counts.get(kind):
            more = f", ... {counts[kind] - limit} more" if counts[kind] > limit else ""
            lines.append(f"{counts[kind]} file(s) {what}, skipped: "
                         f"{', '.join(examples[kind][:limit])}{more}")
    return lines


def _inside(path: str, tree: str) -> bool:
    return os.path.commonpath([path, tree]) == tree


def _entry_kind(entry: os.DirEntry, tree: str) -> str:
    """"file", "dir" (a directory to enter), "link" (a link not followed) or "" (a socket,
    a fifo: nothing to list)."""
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        return "file" if os.path.isfile(target) and _inside(target, tree) else "link"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    return "file" if entry.is_file(follow_symlinks=False) else ""


def _scan(directory: str, tree: str) -> Iterator[tuple[str, str]]:
    """(kind, path) of each entry of `directory` that has one (`_entry_kind`)."""
    with os.scandir(directory) as entries:
        for entry in entries:
            kind = _entry_kind(entry, tree)
            if kind:
                yield kind, entry.path


def _iter_local(top: str, tree: str) -> Iterator[tuple[str, str]]:
    """("file" | "link", path) under `top`, unsorted, never leaving the real path `tree` and
    never entering a directory twice (by device and inode, in case a bind mount makes a loop);
    a walk of a subtree never enters `tree` itself, so subtrees walked apart (predict's Ray
    tasks) stop where one whole walk would."""
    if not _inside(os.path.realpath(top), tree):
        yield "link", top
        return
    seen, stack = set(), [top]
    if os.path.realpath(top) != tree:
        stat = os.stat(tree)
        seen.add((stat.st_dev, stat.st_ino))
    while stack:
        directory = stack.pop()
        stat = os.stat(directory)
        if (stat.st_dev, stat.st_ino) in seen:
            yield "link", directory
            continue
        seen.add((stat.st_dev, stat.st_ino))
        for kind, path in _scan(directory, tree):
            if kind == "dir":
                stack.append(path)
            else:
                yield kind, path


def iter_folder(storage: Storage, directory: str,
                tree: str | None = None) -> Iterator[tuple[str, str]]:
    """("file" | "link", path) for everything under `directory`, unsorted, as `list_folder`
    walks it; lazy on local disk, so a count can stop early (pyarrow lists an object store
    in one call)."""
    if isinstance(storage.fs, pafs.LocalFileSystem):
        yield from _iter_local(directory, os.path.realpath(tree or directory))
    else:
        infos = storage.fs.get_file_info(pafs.FileSelector(directory, recursive=True))
        yield from (("file", i.path) for i in infos if i.type == pafs.FileType.File)


def _split(found: list[tuple[str, str]], suffixes: set[str] | None) -> FolderListing:
    wanted = IMAGE_SUFFIXES if suffixes is None else suffixes
    listing = FolderListing(links=sorted(p for kind, p in found if kind == "link"))
    for path in sorted(p for kind, p in found if kind == "file"):
        (listing.files if Path(path).suffix.lower() in wanted else listing.others).append(path)
    return listing


def list_folder(storage: Storage, directory: str, suffixes: set[str] | None = None,
                tree: str | None = None) -> FolderListing:
    """Every file under `directory` (recursive), split by suffix (`suffixes`, lower case;
    default the image suffixes). On local disk links are handled as the module says, `tree`
    (default `directory`) being the folder no link may lead out of."""
    return _split(list(iter_folder(storage, directory, tree)), suffixes)


def list_first_level(storage: Storage, directory: str) -> tuple[FolderListing, list[str]]:
    """The files directly in `directory` (split and links handled as `list_folder` does) and
    its subdirectories that are not links, both sorted: the units a walk splits into."""
    found, subdirs = [], []
    if isinstance(storage.fs, pafs.LocalFileSystem):
        for kind, path in _scan(directory, os.path.realpath(directory)):
            if kind == "dir":
                subdirs.append(path)
            else:
                found.append((kind, path))
    else:
        for info in storage.fs.get_file_info(pafs.FileSelector(directory)):
            if info.type == pafs.FileType.Directory:
                subdirs.append(info.path)
            elif info.type == pafs.FileType.File:
                found.append(("file", info.path))
    return _split(found, None), sorted(subdirs)


def image_files(storage: Storage, directory: str, tree: str | None = None) -> list[str]:
    """Filesystem paths of every image under `directory`, sorted (`list_folder`'s files)."""
    return list_folder(storage, directory, tree=tree).files
