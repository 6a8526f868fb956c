"""The ID validation split: a stratified slice of the training images that training never sees.

Thresholds (the detector's calibration) and anything else chosen by looking at scores are set
on it, never on the test sets. It is drawn from the run seed alone, so preparing again gives
the same split, and the train manifest records its fraction so a later `prepare` with another
fraction cannot silently pair old classifiers with a validation set they trained on.
"""

from __future__ import annotations

import numpy as np

from oodscale.config import ExperimentConfig
from oodscale.data.shards import try_read_manifest
from oodscale.errors import InputError
from oodscale.runtime import RunLayout, derive_seed

VAL_SPLIT = "val"


def validation_indices(labels: np.ndarray | list[int], fraction: float, seed: int,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), stratified by label and drawn from `seed` alone."""
    labels = np.asarray(labels)
    everything = np.arange(len(labels))
    if fraction == 0:
        return everything, everything[:0]
    from sklearn.model_selection import train_test_split

    try:
        train, val = train_test_split(everything, test_size=fraction, stratify=labels,
                                      random_state=derive_seed(seed, "id-val") % 2**32)
    except ValueError as err:  # a class too small to split, or too few images
        raise InputError(f"cannot carve an ID validation split of data.val_fraction={fraction} "
                         f"from {len(labels)} training images ({err}); raise or lower "
                         f"data.val_fraction, or set it to 0 for no validation split") from None
    return np.sort(train), np.sort(val)


def check_val_fraction(cfg: ExperimentConfig, layout: RunLayout) -> None:
    """Refuse a `prepare` whose data.val_fraction differs from the one the existing train
    split was carved with: the classifiers trained on it would see validation images."""
    train = try_read_manifest(layout.storage, layout.id_split("train"))
    if train is None:
        return
    had = train.extra.get("val_fraction", 0.0)  # splits prepared before this key existed: none
    if had != cfg.data.val_fraction:
        raise InputError(
            f"{layout.storage.uri_of(layout.id_split('train'))} was prepared with "
            f"data.val_fraction={had} but the config asks for {cfg.data.val_fraction}; set "
            f"data.val_fraction={had} to keep it, or delete that experiment's data/id and "
            f"classifiers/ (or use a new storage.root) to prepare and train again")
