"""The paths given to `oodscale predict`, shared by its two engines: opening one, and the error
of a folder that holds no image (the local walk finds it first, the Ray listing last)."""

from __future__ import annotations

import pyarrow.fs as pafs

from oodscale.data.images import IMAGE_SUFFIXES
from oodscale.errors import InputError, MissingError
from oodscale.runtime import Storage, open_storage


def open_argument(path: str) -> tuple[Storage, bool]:
    """The Storage a path given to predict names, and whether it is a folder."""
    storage = open_storage(path)
    info = storage.fs.get_file_info(storage.base)
    if info.type == pafs.FileType.NotFound:
        raise MissingError(f"{path} not found")
    return storage, info.type == pafs.FileType.Directory


def no_images(path: str, skipped: list[str]) -> InputError:
    """The error of a folder given to predict that holds no image."""
    return InputError(" ".join([f"folder {path} holds no images with suffixes "
                                f"{sorted(IMAGE_SUFFIXES)}", *skipped]))
