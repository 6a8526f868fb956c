"""Image files from users: listing folders without leaving them, and opening files with caps.

Every folder walk (prepare's ImageFolder, `--ood` folders, `oodscale predict`, bring-your-own
WebDataset sets) goes through `list_folder`. On local disk it does not follow a link to a
directory (a `sub/up -> ..` loop would list the tree again and again) and takes a link to a
file only when the file lies inside the tree; what it leaves out is listed, never silently
dropped. Object stores have no links: pyarrow's recursive listing is used there as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from oodscale.runtime import Storage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


@dataclass
class FolderListing:
    """The files under a folder, sorted: those with a wanted suffix, the others, and the links
    not followed (a link to a directory, or to a file outside the tree, or a dangling one)."""

    files: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def skipped(self, limit: int = 5) -> list[str]:
        """Lines saying what the listing left out, for a summary (empty when nothing was)."""
        lines = []
        for what, paths in (("without an image suffix", self.others),
                            ("links not followed (a directory, or outside the folder)",
                             self.links)):
            if paths:
                more = f", ... {len(paths) - limit} more" if len(paths) > limit else ""
                lines.append(f"{len(paths)} file(s) {what}, skipped: "
                             f"{', '.join(paths[:limit])}{more}")
        return lines


def _inside(path: str, tree: str) -> bool:
    return os.path.commonpath([path, tree]) == tree


def _walk_local(top: str, tree: str) -> tuple[list[str], list[str]]:
    """(files, links not followed) under `top`, never leaving the real path `tree` and never
    entering a directory twice (by device and inode, in case a bind mount makes a loop)."""
    if not _inside(os.path.realpath(top), tree):
        return [], [top]
    files, links, seen, stack = [], [], set(), [top]
    while stack:
        directory = stack.pop()
        stat = os.stat(directory)
        if (stat.st_dev, stat.st_ino) in seen:
            links.append(directory)
            continue
        seen.add((stat.st_dev, stat.st_ino))
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    ok = os.path.isfile(target) and _inside(target, tree)
                    (files if ok else links).append(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    files.append(entry.path)
    return files, links


def list_folder(storage: Storage, directory: str, suffixes: set[str] | None = None,
                tree: str | None = None) -> FolderListing:
    """Every file under `directory` (recursive), split by suffix (`suffixes`, lower case;
    default the image suffixes). On local disk links are handled as the module says, `tree`
    (default `directory`) being the folder no link may lead out of."""
    wanted = IMAGE_SUFFIXES if suffixes is None else suffixes
    if isinstance(storage.fs, pafs.LocalFileSystem):
        found, links = _walk_local(directory, os.path.realpath(tree or directory))
    else:
        infos = storage.fs.get_file_info(pafs.FileSelector(directory, recursive=True))
        found, links = [i.path for i in infos if i.type == pafs.FileType.File], []
    listing = FolderListing(links=sorted(links))
    for path in sorted(found):
        (listing.files if Path(path).suffix.lower() in wanted else listing.others).append(path)
    return listing


def image_files(storage: Storage, directory: str, tree: str | None = None) -> list[str]:
    """Filesystem paths of every image under `directory`, sorted (`list_folder`'s files)."""
    return list_folder(storage, directory, tree=tree).files
