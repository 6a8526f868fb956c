"""The listing of `predict --engine ray`: folders are walked in Ray Data tasks, not by the driver.

The driver names only its arguments (`roots_of`: one file-info call each). A task lists each
folder's first level (`units_of`) into units: the files directly in it, and each subdirectory.
A task per unit (`files_of`) walks it with the link-safe walk of oodscale.data.images (no link
followed out of the folder or around a loop; a subtree walk never enters the folder again), sorts
its files and cuts them into parts of `PART_FILES`. The files given as arguments are one unit.

A part is named by its unit and its index in it, `part-<unit key>-<index:05d>.parquet`, the key
being 16 hex digits of sha256 over the root's URI and the unit's kind and subtree: which part a
file lands in depends on the inputs alone, never on task timing, so a rerun resumes. Parts whose
names a rerun is handed (`done`) are listed but not emitted. Each unit also emits one note row
(`note`: JSON counts of images, parts, files skipped and the first few skipped) that the driver
sums for the summary; file rows have an empty `note`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from oodscale.data.images import FolderListing, list_first_level, list_folder
from oodscale.predict_inputs import open_argument
from oodscale.runtime import Storage

PART_FILES = 4096  # files per output part: the unit a rerun skips
EXAMPLES = 5  # skipped paths a note carries per kind, for the summary's lines
FILES = -1  # the root index of the unit of files given as arguments


@dataclass(frozen=True)
class Root:
    """A path given to predict: its Storage, whether it is a folder, and the path as given."""

    storage: Storage
    folder: bool
    argument: str


def roots_of(paths: list[str]) -> list[Root]:
    """The arguments as roots (a missing path is an error here, before Ray starts)."""
    return [Root(*open_argument(path), path) for path in paths]


def root_rows(roots: list[Root]) -> list[dict[str, Any]]:
    """The driver's only rows: one per folder, one for all the files given."""
    rows = [{"root": k, "kind": "folder", "sub": ""} for k, r in enumerate(roots) if r.folder]
    if any(not r.folder for r in roots):
        rows.append({"root": FILES, "kind": "files", "sub": ""})
    return rows


def part_name(key: str, index: int) -> str:
    return f"part-{key}-{index:05d}.parquet"


def unit_key(root: str, kind: str, sub: str) -> str:
    return hashlib.sha256("\0".join([root, kind, sub]).encode()).hexdigest()[:16]


def units_of(row: dict[str, Any], roots: list[Root]) -> list[dict[str, Any]]:
    """Ray Data task: a folder's units (its own files, "top", and each subdirectory, "tree");
    the files unit as it is."""
    if row["kind"] == "files":
        return [row]
    storage = roots[row["root"]].storage
    _, subdirs = list_first_level(storage, storage.base)
    return [{**row, "kind": "top"}, *({**row, "kind": "tree", "sub": s} for s in subdirs)]


def _listing(unit: dict[str, Any], roots: list[Root]) -> tuple[FolderListing, list[int], str]:
    """(the unit's listing, the root index of each file, the URI its key hashes)."""
    if unit["kind"] == "files":
        given = sorted((r.storage.base, k) for k, r in enumerate(roots) if not r.folder)
        files = [path for path, _ in given]
        return FolderListing(files=files), [k for _, k in given], "\0".join(
            roots[k].storage.uri for _, k in given)
    root = roots[unit["root"]]
    storage = root.storage
    listing = (list_first_level(storage, storage.base)[0] if unit["kind"] == "top" else
               list_folder(storage, unit["sub"], tree=storage.base))
    return listing, [unit["root"]] * len(listing.files), storage.uri


def files_of(units: dict[str, np.ndarray], roots: list[Root], done: frozenset[str],
             part_files: int) -> Iterator[dict[str, Any]]:
    """Ray Data task: each unit's files, sorted and cut into parts of `part_files` (the
    driver's `PART_FILES`, read where a test can set it), a batch per part not in `done`,
    then the unit's note."""
    for unit in ({k: v[i] for k, v in units.items()} for i in range(len(units["kind"]))):
        listing, owners, uri = _listing(unit, roots)
        key = unit_key(uri, str(unit["kind"]), str(unit["sub"]))
        parts = -(-len(listing.files) // part_files)
        for index in range(parts):
            name = part_name(key, index)
            if name in done:
                continue
            span = slice(index * part_files, (index + 1) * part_files)
            paths, where = listing.files[span], owners[span]
            yield {"part": np.full(len(paths), name, object),
                   "part_size": np.full(len(paths), len(paths)),
                   "root": np.asarray(where), "path": np.asarray(paths, object),
                   "uri": np.asarray([roots[k].storage.uri_of(p)
                                      for k, p in zip(where, paths, strict=True)], object),
                   "note": np.full(len(paths), "", object)}
        note = {"argument": (roots[int(unit["root"])].argument if unit["root"] != FILES
                             else ""), "images": len(listing.files), "key": key,
                "parts": parts, "done": sum(part_name(key, i) in done for i in range(parts)),
                "others": len(listing.others), "links": len(listing.links),
                "examples": {"others": listing.others[:EXAMPLES],
                             "links": listing.links[:EXAMPLES]}}
        yield {"part": np.asarray([""], object), "part_size": np.asarray([0]),
               "root": np.asarray([unit["root"]]), "path": np.asarray([""], object),
               "uri": np.asarray([""], object), "note": np.asarray([json.dumps(note)], object)}
