"""The prepare stage: ID train/val/test shards and every OOD test set, each with its manifest."""

from __future__ import annotations

import numpy as np

from oodscale.config import ExperimentConfig
from oodscale.data import builtin
from oodscale.data.fashion_mnist import fashion_splits
from oodscale.data.shards import Manifest, try_read_manifest, write_split
from oodscale.data.sources import prepare_external, prepare_extra_ood
from oodscale.data.validation import VAL_SPLIT, check_val_fraction, validation_indices
from oodscale.errors import InputError
from oodscale.runtime import RunLayout, derive_seed

IN_MEMORY_SOURCES = ("digits", "fashion_mnist")


def _write_id(layout: RunLayout, cfg: ExperimentConfig, split: str, data: builtin.Split) -> None:
    manifest = Manifest(kind="id", split=split, image_size=cfg.data.image_size,
                        channels=cfg.data.channels, class_names=data.class_names,
                        extra={"source": cfg.data.source, "id_classes": cfg.data.id_classes,
                               "val_fraction": cfg.data.val_fraction})
    metas = [{"label": int(y)} for y in data.labels]
    write_split(layout.storage, layout.id_split(split), split, data.images, metas,
                cfg.data.shard_size, manifest)


def _write_ood(layout: RunLayout, cfg: ExperimentConfig, name: str, images: np.ndarray,
               out_dir: str, purpose: str) -> None:
    group = "near" if name in cfg.data.near_ood else "far"
    manifest = Manifest(kind="ood", split=name, image_size=cfg.data.image_size,
                        channels=cfg.data.channels, class_names=[],
                        extra={"group": group, "source": "builtin", "purpose": purpose,
                               "sources": builtin.source_count(name, len(images))})
    metas = [{"label": -1} for _ in range(len(images))]
    write_split(layout.storage, out_dir, name, images, metas, cfg.data.shard_size, manifest)


Splits = tuple[builtin.Split, builtin.Split, builtin.Split, builtin.Split]


def _in_memory_splits(cfg: ExperimentConfig) -> Splits:
    """(ID train, ID test, held-out classes, their validation pool) of a data set small enough
    to hold in memory."""
    if cfg.data.source == "fashion_mnist":
        return fashion_splits(cfg.data.path, cfg.data.image_size, cfg.data.channels,
                              cfg.data.id_classes, cfg.data.max_train_per_class,
                              cfg.data.max_test_per_class, cfg.seed)
    train, test, held = builtin.digits_splits(cfg.data.image_size, cfg.data.channels,
                                              cfg.data.test_fraction, cfg.seed,
                                              cfg.data.id_classes)
    for name, split, cap in (("train", train, cfg.data.max_train_per_class),
                             ("test", test, cfg.data.max_test_per_class)):
        keep = builtin.cap_per_class(split.labels, cap, derive_seed(cfg.seed, "cap", name))
        split.images, split.labels = split.images[keep], split.labels[keep]
    return train, test, *builtin.held_out_validation(held, cfg.data.val_fraction, cfg.seed)


def _prepare_in_memory(cfg: ExperimentConfig, layout: RunLayout, force: bool,
                       ) -> tuple[list[str], builtin.Split, builtin.Split]:
    written = []
    train, test, held, held_val = _in_memory_splits(cfg)
    keep, val = validation_indices(train.labels, cfg.data.val_fraction, cfg.seed)
    splits = {"train": builtin.Split(train.images[keep], train.labels[keep], train.class_names),
              VAL_SPLIT: builtin.Split(train.images[val], train.labels[val], train.class_names),
              "test": test}
    for split, data in splits.items():
        if split == VAL_SPLIT and not len(val):
            continue
        if force or try_read_manifest(layout.storage, layout.id_split(split)) is None:
            _write_id(layout, cfg, split, data)
            written.append(f"id/{split} ({len(data.images)} images)")
    return written, held, held_val


def prepare(cfg: ExperimentConfig, layout: RunLayout, force: bool = False) -> list[str]:
    """Write ID and OOD shards; skips directories whose manifest exists unless `force`.

    Returns the names of the directories written, for the job's summary line.
    """
    if not force:
        check_val_fraction(cfg, layout)
    held_val = None
    if cfg.data.source in IN_MEMORY_SOURCES:
        written, held, held_val = _prepare_in_memory(cfg, layout, force)
    else:
        if "openset" in cfg.data.ood_sets:
            raise InputError("the built-in 'openset' OOD set is the held-out classes of an "
                             "in-memory source (digits, fashion_mnist); for "
                             f"data.source={cfg.data.source} remove it from data.ood_sets and "
                             "add the held-out classes as data.extra_ood")
        written, held = prepare_external(cfg, layout, force), None
    sets = [("ood", name, layout.ood_set(name), held) for name in cfg.data.ood_sets]
    sets += [("ood-val", name, layout.ood_val_set(name), held_val)
             for name in cfg.data.validation_ood_sets]
    data = cfg.data
    for purpose, name, out_dir, pool in sets:
        if force or try_read_manifest(layout.storage, out_dir) is None:
            images = builtin.builtin_ood(name, data.ood_set_size(name, purpose), data.image_size,
                                         data.channels, cfg.seed, pool, purpose,
                                         data.val_set_size)
            _write_ood(layout, cfg, name, images, out_dir, purpose)
            written.append(f"{purpose}/{name} ({len(images)} images)")
    return written + prepare_extra_ood(cfg, layout, force)
