"""The prepare stage: ID train/val/test shards and every OOD test set, each with its manifest."""

from __future__ import annotations

import numpy as np

from oodscale.config import ExperimentConfig
from oodscale.data import builtin
from oodscale.data.ood_table import OOD_SETS
from oodscale.data.shards import Manifest, try_read_manifest, write_split
from oodscale.data.source_table import DATA_SOURCES
from oodscale.data.sources import prepare_extra_ood
from oodscale.data.validation import check_val_fraction
from oodscale.errors import InputError
from oodscale.lazy import load
from oodscale.runtime import RunLayout


def _write_ood(layout: RunLayout, cfg: ExperimentConfig, name: str, images: np.ndarray,
               out_dir: str, purpose: str) -> None:
    group = "near" if name in cfg.data.near_ood else "far"
    manifest = Manifest(kind="ood", split=name, image_size=cfg.data.image_size,
                        channels=cfg.data.channels, class_names=[],
                        extra={"group": group, "source": "builtin", "purpose": purpose,
                               "sources": builtin.source_count(name, len(images))})
    metas = [{"label": -1} for _ in range(len(images))]
    write_split(layout.storage, out_dir, name, images, metas, cfg.data.shard_size, manifest)


def prepare(cfg: ExperimentConfig, layout: RunLayout, force: bool = False) -> list[str]:
    """Write ID and OOD shards; skips directories whose manifest exists unless `force`.

    Returns the names of the directories written, for the job's summary line.
    """
    if not force:
        check_val_fraction(cfg, layout)
    spec = DATA_SOURCES[cfg.data.source]
    held_out = [n for n in cfg.data.ood_sets if OOD_SETS[n].held_out]
    if held_out and not spec.held_out:
        keeping = ", ".join(n for n, s in DATA_SOURCES.items() if s.held_out)
        raise InputError(f"the built-in {held_out[0]!r} OOD set is the held-out classes of a "
                         f"source that keeps them ({keeping}); for data.source="
                         f"{cfg.data.source} remove it from data.ood_sets and add the held-out "
                         f"classes as data.extra_ood")
    prepared = load(spec.prepare)(cfg, layout, force)
    written, held, held_val = prepared.written, prepared.held, prepared.held_val
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
