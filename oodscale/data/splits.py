"""ID data held in memory → the ID train/val/test shards, the writer every in-memory data
source shares (digits, Fashion-MNIST), so each source only says how its images are split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oodscale.config import ExperimentConfig
from oodscale.data.shards import Manifest, try_read_manifest, write_split
from oodscale.data.validation import VAL_SPLIT, validation_indices
from oodscale.runtime import RunLayout


@dataclass
class Split:
    """Images (N×H×W×C uint8) with ID labels relabelled to 0..K-1 and their class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


# (ID train, ID test, held-out classes, their validation pool) of an in-memory source
Splits = tuple[Split, Split, Split, Split]


@dataclass
class PreparedID:
    """What a data source's prepare function did: the directories it wrote (for the job's
    summary line) and, where the source keeps them, the held-out classes that the `openset`
    OOD set and its validation counterpart are drawn from."""

    written: list[str]
    held: Split | None = None
    held_val: Split | None = None


def _write_id(layout: RunLayout, cfg: ExperimentConfig, split: str, data: Split) -> None:
    manifest = Manifest(kind="id", split=split, image_size=cfg.data.image_size,
                        channels=cfg.data.channels, class_names=data.class_names,
                        extra={"source": cfg.data.source, "id_classes": cfg.data.id_classes,
                               "val_fraction": cfg.data.val_fraction})
    metas = [{"label": int(y)} for y in data.labels]
    write_split(layout.storage, layout.id_split(split), split, data.images, metas,
                cfg.data.shard_size, manifest)


def write_in_memory(cfg: ExperimentConfig, layout: RunLayout, force: bool,
                    splits: Splits) -> PreparedID:
    """Carve the ID validation split from the training images and write every ID split whose
    manifest is missing (all of them with `force`)."""
    written = []
    train, test, held, held_val = splits
    keep, val = validation_indices(train.labels, cfg.data.val_fraction, cfg.seed)
    parts = {"train": Split(train.images[keep], train.labels[keep], train.class_names),
             VAL_SPLIT: Split(train.images[val], train.labels[val], train.class_names),
             "test": test}
    for split, data in parts.items():
        if split == VAL_SPLIT and not len(val):
            continue
        if force or try_read_manifest(layout.storage, layout.id_split(split)) is None:
            _write_id(layout, cfg, split, data)
            written.append(f"id/{split} ({len(data.images)} images)")
    return PreparedID(written, held, held_val)
