"""Fashion-MNIST from its four original idx .gz files (Debian's `dataset-fashion-mnist`).

Read with numpy alone: the idx format is a 4-byte magic (dtype code, rank), the dimensions as
big-endian uint32, then the raw array. The files of the dataset's own release are the same bytes,
so `data.path` may point at either.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from oodscale.data.builtin import cap_per_class, resize
from oodscale.data.splits import PreparedID, Split, Splits, write_in_memory
from oodscale.errors import InputError, MissingError
from oodscale.runtime import derive_seed

if TYPE_CHECKING:
    from oodscale.config import ExperimentConfig
    from oodscale.runtime import RunLayout

DEBIAN_PATH = "/usr/share/datasets/fashion-mnist"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle-boot"]
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_INSTALL = ("install Debian's package (apt-get install dataset-fashion-mnist, files under "
            f"{DEBIAN_PATH}) or put the four .gz files of the Fashion-MNIST release in data.path")


def read_idx(path: Path) -> np.ndarray:
    """One idx file (gzipped or not) as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise InputError(f"cannot read idx file {path}: {err}; {_INSTALL}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path} is not an unsigned-byte idx file (magic {raw[:4].hex()})")
    rank = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(dims)):
        raise InputError(f"idx file {path} is truncated: {body.size} bytes for shape {dims}")
    return body.reshape(dims)


def load_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N×28×28 uint8 images, N int64 labels) of the train or test split under `root`."""
    base = Path(root)
    paths = [base / name for name in _FILES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MissingError(f"Fashion-MNIST file {missing[0]} not found; {_INSTALL}")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InputError(f"Fashion-MNIST {split} files under {base} disagree: images "
                         f"{images.shape}, labels {labels.shape}")
    if labels.max() >= len(CLASSES):
        raise InputError(f"Fashion-MNIST labels under {base} go up to {labels.max()}; "
                         f"expected 0..{len(CLASSES) - 1}")
    return images, labels.astype(np.int64)


def fashion_splits(root: str | None, image_size: int, channels: int, id_classes: list[int] | None,
                   train_cap: int | None, test_cap: int | None, seed: int,
                   ) -> Splits:
    """(ID train, ID test, held-out classes, held-out classes for validation), with the
    release's own train/test split.

    The held-out classes of the test images are the open-set (near-OOD) test set; those of the
    training images, disjoint from it, are its validation counterpart.
    """
    root = root or DEBIAN_PATH
    keep = list(range(len(CLASSES))) if id_classes is None else sorted(set(id_classes))
    unknown = [c for c in keep if not 0 <= c < len(CLASSES)]
    if unknown:
        raise InputError(f"data.id_classes {unknown} out of range: Fashion-MNIST has classes "
                         f"0..{len(CLASSES) - 1} ({', '.join(CLASSES)})")
    remap = np.full(len(CLASSES), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    names = [CLASSES[c] for c in keep]

    def id_part(split: str, cap: int | None) -> tuple[Split, Split]:
        images, labels = load_split(root, split)
        ours = np.flatnonzero(remap[labels] >= 0)
        ours = ours[cap_per_class(labels[ours], cap, derive_seed(seed, "fashion", split))]
        rest = np.flatnonzero(remap[labels] < 0)
        return (Split(_resized(images[ours], image_size, channels), remap[labels[ours]], names),
                Split(_resized(images[rest], image_size, channels),
                      np.full(len(rest), -1, dtype=np.int64), []))

    train, held_val = id_part("train", train_cap)
    test, held = id_part("test", test_cap)
    return train, test, held, held_val


def fashion_source_splits(cfg: ExperimentConfig) -> Splits:
    """The `fashion_mnist` data source's splits, as the config asks (see `fashion_splits`)."""
    data = cfg.data
    return fashion_splits(data.path, data.image_size, data.channels, data.id_classes,
                          data.max_train_per_class, data.max_test_per_class, cfg.seed)


def prepare_fashion_mnist(cfg: ExperimentConfig, layout: RunLayout, force: bool) -> PreparedID:
    """The `fashion_mnist` row of oodscale.data.source_table."""
    return write_in_memory(cfg, layout, force, fashion_source_splits(cfg))


def _resized(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    if not len(images):
        return np.zeros((0, size, size, channels), dtype=np.uint8)
    return np.stack([resize(im, size, channels) for im in images])
