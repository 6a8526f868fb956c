"""The ID data sets `data.source` may name: one table the config validates against.

It imports nothing heavy; each row names its prepare function, imported on use. A row says
what the config must check before any work starts (a path needed, flips allowed, the class
count) and what the prepare stage may ask of it (held-out classes for the open-set split).
Adding a source: its prepare function and one row.
"""

from __future__ import annotations

from dataclasses import dataclass

from oodscale.errors import InputError


@dataclass(frozen=True)
class DataSourceSpec:
    """One row of the table."""

    # "module:function(cfg, layout, force) -> oodscale.data.splits.PreparedID": writes the ID
    # train/val/test shards and returns the held-out classes where the source has them
    prepare: str
    needs_path: bool  # data.path is required (else the implementation has its own default)
    num_classes: int | None  # classes of the whole set; None = known only from the data
    held_out: bool = False  # the unkept classes are the built-in `openset` OOD set
    mirror_safe: bool = True  # a mirrored image is still its class (train.augment.flip)
    same_as_ood: str | None = None  # the built-in OOD set that is this very data


_DATA = "oodscale.data"
DATA_SOURCES: dict[str, DataSourceSpec] = {
    "digits": DataSourceSpec(f"{_DATA}.builtin:prepare_digits", needs_path=False,
                             num_classes=10, held_out=True, mirror_safe=False,
                             same_as_ood="digits"),
    "fashion_mnist": DataSourceSpec(f"{_DATA}.fashion_mnist:prepare_fashion_mnist",
                                    needs_path=False, num_classes=10, held_out=True),
    "imagefolder": DataSourceSpec(f"{_DATA}.sources:prepare_imagefolder", needs_path=True,
                                  num_classes=None),
    "cifar10": DataSourceSpec(f"{_DATA}.sources:prepare_cifar10", needs_path=True,
                              num_classes=10),
}


def check_data_source(name: str) -> str:
    """`name` if the table has it, else an error listing the valid names."""
    if name not in DATA_SOURCES:
        raise InputError(f"unknown data source {name!r}; valid names: {', '.join(DATA_SOURCES)}")
    return name
