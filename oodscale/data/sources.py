"""External datasets → WebDataset shards with a Ray Data pipeline.

ImageFolder trees (ImageNet's layout: `<root>/train/<class>/*.JPEG`, `<root>/val/<class>/*`),
CIFAR-10's binary batches (read as raw bytes: no unpickling), and bring-your-own OOD sets
(an ImageFolder tree or WebDataset shards). Decoding and resizing run in parallel Ray tasks,
one whole shard per task, so shards are deterministic and the driver only writes manifests.
"""

from __future__ import annotations

import itertools
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from oodscale.config import ExperimentConfig, OODSetSource
from oodscale.data.builtin import resize
from oodscale.data.images import (
    DEFAULT_LIMITS,
    IMAGE_SUFFIXES,
    ImageLimits,
    decode_to_size,
    image_files,
    list_folder,
    read_image_bytes,
)
from oodscale.data.shards import (
    Manifest,
    ShardError,
    ShardInfo,
    iter_raw_samples,
    shard_name,
    try_read_manifest,
    write_manifest,
    write_shard,
    write_split,
)
from oodscale.data.splits import PreparedID
from oodscale.data.validation import VAL_SPLIT, validation_indices
from oodscale.errors import InputError, MissingError
from oodscale.runtime import RunLayout, derive_seed, open_storage

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def list_imagefolder(root: str) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, class names) of an ImageFolder split: one sub-directory per class."""
    storage = open_storage(root)
    if not storage.exists(storage.base):
        raise MissingError(f"ImageFolder directory {root} not found; check data.path")
    infos = storage.fs.get_file_info(pafs.FileSelector(storage.base))
    local = isinstance(storage.fs, pafs.LocalFileSystem)  # a linked class is not followed
    classes = sorted(Path(i.path).name for i in infos if i.type == pafs.FileType.Directory
                     and not (local and Path(i.path).is_symlink()))
    if not classes:
        raise InputError(f"{root} has no class sub-directories; an ImageFolder tree is "
                         f"<root>/<class>/<image> (ImageNet: <root>/train/n01440764/*.JPEG)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = image_files(storage, f"{storage.base}/{name}", tree=storage.base)
        files += found
        labels += [label] * len(found)
    if not files:
        raise InputError(f"{root} holds no images with suffixes {sorted(IMAGE_SUFFIXES)}")
    if len(classes) < 2:
        raise InputError(f"{root} has one class directory ({classes[0]}); in-distribution data "
                         f"needs at least two classes. For a set of outliers use --ood "
                         f"NAME={root} (or data.extra_ood) instead")
    return files, labels, classes


decode_image = decode_to_size  # a user's image file → size×size×channels uint8, checked


class ShardWriter:
    """Ray Data task: decode, resize and write whole shards (rows = shard jobs)."""

    def __init__(self, storage_root: str, source_root: str, out_dir: str, prefix: str,
                 size: int, channels: int, limits: ImageLimits = DEFAULT_LIMITS):
        self.storage = open_storage(storage_root)
        self.source = open_storage(source_root)
        self.out_dir, self.prefix, self.size, self.channels = out_dir, prefix, size, channels
        self.limits = limits

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"path": [], "count": [], "sha256": [], "size": []}
        for index, files, labels in zip(batch["shard"], batch["files"], batch["labels"],
                                        strict=True):
            samples = ((f"{self.prefix}_{int(index):06d}_{i:06d}",
                        decode_image(read_image_bytes(self.source, f, self.limits), self.size,
                                     self.channels, f, self.limits),
                        {"label": int(y)}) for i, (f, y) in enumerate(zip(files, labels,
                                                                          strict=True)))
            info = write_shard(self.storage, self.out_dir, shard_name(self.prefix, int(index)),
                               samples)
            out["path"].append(info.path)
            out["count"].append(info.count)
            out["sha256"].append(info.sha256)
            out["size"].append(info.size)
        return out


def shard_files_with_ray(layout: RunLayout, source_root: str, out_dir: str, prefix: str,
                         files: list[str], labels: list[int], manifest: Manifest,
                         shard_size: int, cpus_per_task: float = 0.5,
                         limits: ImageLimits = DEFAULT_LIMITS) -> Manifest:
    """Write `files` as shards in parallel Ray tasks, then the manifest (last)."""
    import ray.data

    order = np.random.default_rng(derive_seed(prefix, len(files))).permutation(len(files))
    jobs = [{"shard": i, "files": [files[j] for j in order[s:s + shard_size]],
             "labels": [labels[j] for j in order[s:s + shard_size]]}
            for i, s in enumerate(range(0, len(files), shard_size))]
    layout.storage.makedirs(out_dir)
    rows = ray.data.from_items(jobs, override_num_blocks=len(jobs)).map_batches(
        ShardWriter, batch_size=1, num_cpus=cpus_per_task,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(len(jobs), 8))),
        fn_constructor_kwargs={"storage_root": layout.storage.uri, "source_root": source_root,
                               "out_dir": out_dir,
                               "prefix": prefix, "size": manifest.image_size,
                               "channels": manifest.channels, "limits": limits}).take_all()
    manifest.shards = sorted((ShardInfo.from_row(r) for r in rows), key=lambda s: s.path)
    write_manifest(layout.storage, out_dir, manifest)
    return manifest


def read_cifar10_binary(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary batches (`cifar-10-batches-bin`): 1 label byte + 3072 pixel bytes each."""
    base = Path(root)
    if (base / "cifar-10-batches-bin").is_dir():
        base = base / "cifar-10-batches-bin"
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise MissingError(f"CIFAR-10 binary batch {base / missing[0]} not found; download "
                                f"cifar-10-binary.tar.gz and extract it under data.path")
    raw = np.concatenate([np.fromfile(base / n, dtype=np.uint8) for n in names])
    if raw.size % 3073:
        raise InputError(f"CIFAR-10 batches under {base} are truncated ({raw.size} bytes)")
    rows = raw.reshape(-1, 3073)
    images = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), rows[:, 0].astype(np.int64)


def _id_manifest(cfg: ExperimentConfig, split: str, classes: list[str]) -> Manifest:
    return Manifest(kind="id", split=split, image_size=cfg.data.image_size,
                    channels=cfg.data.channels, class_names=classes,
                    extra={"source": cfg.data.source, "path": cfg.data.path,
                           "id_classes": cfg.data.id_classes,
                           "val_fraction": cfg.data.val_fraction})


def _keep_classes(cfg: ExperimentConfig, labels: list[int], classes: list[str],
                  ) -> tuple[np.ndarray, dict[int, int], list[str]]:
    keep = cfg.data.id_classes if cfg.data.id_classes is not None else list(range(len(classes)))
    bad = [c for c in keep if not 0 <= c < len(classes)]
    if bad:
        raise InputError(f"data.id_classes {bad} out of range: the data has {len(classes)} "
                         f"classes (0..{len(classes) - 1})")
    remap = {c: i for i, c in enumerate(keep)}
    mask = np.isin(np.asarray(labels), keep)
    return mask, remap, [classes[c] for c in keep]


def _carve(cfg: ExperimentConfig, split: str, labels: list[int]) -> dict[str, np.ndarray]:
    """Row indices per output split: the training rows give train and the ID validation split."""
    if split != "train":
        return {split: np.arange(len(labels))}
    keep, val = validation_indices(labels, cfg.data.val_fraction, cfg.seed)
    return {"train": keep, VAL_SPLIT: val}


def _todo(cfg: ExperimentConfig, layout: RunLayout, force: bool) -> dict[str, list[str]]:
    """Per split of the source (train, test), the ID splits it gives whose manifest is
    missing (all with `force`); train gives train and the ID validation split."""
    todo = {}
    for split in ("train", "test"):
        outputs = [split, VAL_SPLIT] if split == "train" and cfg.data.val_fraction else [split]
        names = [name for name in outputs
                 if force or try_read_manifest(layout.storage, layout.id_split(name)) is None]
        if names:
            todo[split] = names
    return todo


def prepare_cifar10(cfg: ExperimentConfig, layout: RunLayout, force: bool) -> PreparedID:
    """The `cifar10` row of oodscale.data.source_table: ID shards from the binary batches."""
    written = []
    for split, todo in _todo(cfg, layout, force).items():
        images, labels = read_cifar10_binary(cfg.data.path, split)
        mask, remap, names = _keep_classes(cfg, labels.tolist(), CIFAR10_CLASSES)
        images, kept = images[mask], [remap[int(y)] for y in labels[mask]]
        parts = _carve(cfg, split, kept)
        for name in todo:
            rows = parts[name]
            resized = np.stack([resize(images[i], cfg.data.image_size, cfg.data.channels)
                                for i in rows])
            write_split(layout.storage, layout.id_split(name), name, resized,
                        [{"label": kept[i]} for i in rows], cfg.data.shard_size,
                        _id_manifest(cfg, name, names))
            written.append(f"id/{name} ({len(rows)} images)")
    return PreparedID(written)


def prepare_imagefolder(cfg: ExperimentConfig, layout: RunLayout, force: bool) -> PreparedID:
    """The `imagefolder` row of oodscale.data.source_table: ID shards from `<path>/train`
    and `<path>/val` (or `<path>/test`), decoded in parallel Ray tasks."""
    written = []
    for split, todo in _todo(cfg, layout, force).items():
        folder = "train" if split == "train" else "val"
        root = f"{cfg.data.path.rstrip('/')}/{folder}"
        if folder == "val" and not open_storage(root).exists(open_storage(root).base):
            root = f"{cfg.data.path.rstrip('/')}/test"
        files, labels, classes = list_imagefolder(root)
        mask, remap, names = _keep_classes(cfg, labels, classes)
        files = [f for f, m in zip(files, mask, strict=True) if m]
        labels = [remap[y] for y, m in zip(labels, mask, strict=True) if m]
        parts = _carve(cfg, split, labels)
        for name in todo:
            rows = parts[name]
            shard_files_with_ray(layout, root, layout.id_split(name), name,
                                 [files[i] for i in rows], [labels[i] for i in rows],
                                 _id_manifest(cfg, name, names), cfg.data.shard_size,
                                 limits=ImageLimits.from_config(cfg.data))
            written.append(f"id/{name} ({len(rows)} images)")
    return PreparedID(written)


def prepare_extra_ood(cfg: ExperimentConfig, layout: RunLayout, force: bool) -> list[str]:
    """Bring-your-own OOD sets (ImageFolder or WebDataset) re-sharded at the ID image size."""
    written = []
    for source in cfg.data.extra_ood:
        out_dir = layout.ood_set(source.name)
        if not force and try_read_manifest(layout.storage, out_dir) is not None:
            continue
        manifest = Manifest(kind="ood", split=source.name, image_size=cfg.data.image_size,
                            channels=cfg.data.channels, class_names=[],
                            extra={"group": source.group, "source": source.format,
                                   "path": source.path})
        if source.format == "imagefolder":
            src = open_storage(source.path)
            if not src.exists(src.base):
                raise MissingError(f"OOD set {source.name}: {source.path} not found")
            files = image_files(src, src.base)
            if not files:
                raise InputError(f"OOD set {source.name}: no images under {source.path}")
            shard_files_with_ray(layout, source.path, out_dir, source.name, files,
                                 [-1] * len(files),
                                 manifest, cfg.data.shard_size,
                                 limits=ImageLimits.from_config(cfg.data))
            written.append(f"ood/{source.name} ({len(files)} images)")
        else:
            count = _reshard_webdataset(cfg, layout, source, out_dir, manifest)
            written.append(f"ood/{source.name} ({count} images)")
    return written


def _webdataset_images(source: OODSetSource, size: int, channels: int,
                       limits: ImageLimits) -> Iterator[np.ndarray]:
    """Every image of a user's WebDataset shards (any image member), resized, one at a time:
    read through the checked tar reader (plain tar only, members capped) and the checked
    image opener (`limits`, supported formats only)."""
    storage = open_storage(source.path)
    tars = list_folder(storage, storage.base, {".tar"}).files
    if not tars:
        raise InputError(f"OOD set {source.name}: no .tar shards under {source.path}")
    for tar in tars:
        try:
            for sample in iter_raw_samples(storage, tar, limits.max_bytes):
                key = next((k for k in sample if "." + k.split(".")[-1] in IMAGE_SUFFIXES), None)
                if key is None:
                    raise InputError(f"OOD set {source.name}: sample {sample['__key__']} in "
                                     f"{tar} has no image member")
                yield decode_image(sample[key], size, channels, f"{tar}:{sample['__key__']}",
                                   limits)
        except tarfile.TarError as err:
            raise ShardError(f"OOD set {source.name}: cannot read {storage.uri_of(tar)} as a "
                             f"tar ({err}); give uncompressed WebDataset shards") from None


def _reshard_webdataset(cfg: ExperimentConfig, layout: RunLayout, source: OODSetSource,
                        out_dir: str, manifest: Manifest) -> int:
    """A user's WebDataset OOD set re-sharded at the ID image size, a shard in memory at a
    time (never the whole set), then the manifest (last); returns the image count."""
    size = cfg.data.shard_size
    images = _webdataset_images(source, cfg.data.image_size, cfg.data.channels,
                                ImageLimits.from_config(cfg.data))
    layout.storage.makedirs(out_dir)
    manifest.shards, count = [], 0
    while chunk := list(itertools.islice(images, size)):
        samples = ((f"{source.name}_{count + i:08d}", image, {"label": -1})
                   for i, image in enumerate(chunk))
        manifest.shards.append(write_shard(layout.storage, out_dir,
                                           shard_name(source.name, len(manifest.shards)), samples))
        count += len(chunk)
    if not count:
        raise InputError(f"OOD set {source.name}: no images in the shards under {source.path}")
    write_manifest(layout.storage, out_dir, manifest)
    return count
