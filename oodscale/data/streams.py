"""Shards into Ray Train workers with equal step counts on every rank.

Small shard sets (`rows_fit_in_cache`) are read whole by each worker in its own process
(`CachedShards`) and kept on its device. Large ones stream: Ray Data reads the WebDataset
shards (local, s3://, gs://) and Ray Train splits the rows equally across ranks. Each rank
then sees the same number of *full* batches per pass, so DDP ranks never wait on one another.
Ray Data's local shuffle buffer can emit short batches mid-stream (ray issue 66085), which
would desynchronise ranks; we shuffle instead by mixing a window of full batches, which keeps
the batch count exact.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from oodscale.data.shards import (
    Manifest,
    ShardError,
    iter_raw_samples,
    read_manifest,
    sample_image,
    shard_paths,
    unreadable_shard,
)
from oodscale.errors import InputError
from oodscale.runtime import Storage, open_storage


def _decode_sample(sample: dict[str, Any], num_classes: int, keys: bool = False,
                   ) -> dict[str, Any]:
    """Ray Data webdataset decoder: raw tar members → image (C×H×W uint8) and label, and with
    `keys` the sample's `__key__` (evaluation pairs images across classifiers by it).

    Labels are checked here, on the host, once per read, so training steps can trust them
    without a host sync (-1 marks rows without an ID class: OOD and synthetic samples).
    """
    image = sample_image(sample).transpose(2, 0, 1)
    meta = json.loads(sample["json"])
    label = int(meta.get("label", -1))
    if not -1 <= label < num_classes:
        raise InputError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has "
                         f"label {label}, outside [0, {num_classes}) of its manifest's classes; "
                         f"the shard does not belong to this manifest: rerun `oodscale prepare`")
    row = {"image": np.ascontiguousarray(image), "label": label, "order": sample_order(sample)}
    if keys:
        row["key"] = str(sample["__key__"])
    return row


def sample_order(sample: dict[str, Any]) -> int:
    """A fixed 63-bit number per sample (from its shard's name and its key): rows sorted by it
    come in the same order however Ray Data's blocks arrive."""
    name = f"{str(sample.get('__url__', '')).rsplit('/', 1)[-1]}/{sample.get('__key__')}"
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def _checked_shards(storage: Storage, directory: str, hint: str) -> tuple[Manifest, list[str]]:
    """A shard set's manifest and its shards' paths, every shard checked (`shard_paths`)."""
    manifest = read_manifest(storage, directory, hint)
    paths = shard_paths(storage, directory, manifest)
    if not paths:
        raise InputError(f"{storage.uri_of(directory)} lists no shards; {hint}")
    return manifest, paths


def _ray_dataset(storage: Storage, paths: list[str], manifest: Manifest, keys: bool = False):
    import ray.data

    decoder = functools.partial(_decode_sample, num_classes=len(manifest.class_names), keys=keys)
    return ray.data.read_webdataset(paths, filesystem=storage.fs, decoder=decoder)


def read_shards(storage: Storage, directory: str, hint: str = "run `oodscale prepare`",
                keys: bool = False):
    """A Ray Dataset of {image, label} rows (and `key` with `keys`) over the shards a manifest
    lists."""
    manifest, paths = _checked_shards(storage, directory, hint)
    return _ray_dataset(storage, paths, manifest, keys), manifest


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [-1, 1], the range both the DDPM and the classifiers use."""
    return images.float().div(127.5).sub(1.0)


def from_model_output(images: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] (B×C×H×W) → uint8 B×H×W×C for PNG shards."""
    x = images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def endless_batches(shard, batch_size: int, seed: int, device: torch.device | str,
                    window: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """Full batches on `device` forever: pass after pass over this rank's split, shuffled
    within windows. This is where every training batch meets its device: Ray Data moves it
    (`iter_torch_batches(device=...)`, never Ray's implicit "auto"), and the shuffle stays on
    that device.
    """
    gen = torch.Generator().manual_seed(seed)  # host: the order is the same on CPU and GPU
    while True:
        produced = 0
        pending: list[dict[str, torch.Tensor]] = []
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              device=device):
            pending.append(batch)
            if len(pending) == window:
                yield from _mix(pending, gen)
                produced += len(pending)
                pending = []
        if pending:
            yield from _mix(pending, gen)
            produced += len(pending)
        if produced == 0:
            raise InputError(f"this rank's data split has fewer rows than one batch of "
                             f"{batch_size}; lower the batch size or the number of workers")


def rows_fit_in_cache(manifest, num_workers: int, cache_mb: float) -> bool:
    """Whether one worker's share of a shard set fits `cache_mb` as uint8 images (and the
    whole set, which each worker reads once to pick its share, fits four times that)."""
    size = manifest.num_samples * manifest.channels * manifest.image_size ** 2
    return size / num_workers <= cache_mb * 2**20 and size <= 4 * cache_mb * 2**20


@dataclass(frozen=True)
class CachedShards:
    """A shard set small enough for every worker to read whole, in its own process.

    Ray Data would start read tasks (fresh processes that import torch) for every worker group:
    4 s of an 18 s digits `train` stage on the 2-core machine, for 682 images that one process
    decodes in a few hundredths of a second. Large sets stream through Ray Data instead."""

    storage_uri: str
    directory: str

    def read(self) -> dict[str, torch.Tensor]:
        return read_rows(open_storage(self.storage_uri), self.directory)


def read_rows(storage: Storage, directory: str) -> dict[str, torch.Tensor]:
    """Every row of a shard set, decoded as Ray Data's reader decodes them (C×H×W uint8
    `image`, checked `label`, `order`), its shards checked against the manifest and read in
    parallel threads (reads and PNG decoding release the GIL)."""
    manifest = read_manifest(storage, directory)
    decode = functools.partial(_decode_sample, num_classes=len(manifest.class_names))
    shape = (manifest.channels, manifest.image_size, manifest.image_size)

    def shard_rows(path: str) -> list[dict[str, Any]]:
        try:
            raw = list(iter_raw_samples(storage, path))
        except Exception as err:  # tarfile and pyarrow raise their own types
            raise unreadable_shard(storage, path, err) from err
        rows = [decode(sample) for sample in raw]
        for sample, row in zip(raw, rows, strict=True):
            if row["image"].shape != shape:
                raise ShardError(
                    f"sample {sample['__key__']!r} in {storage.uri_of(path)} is "
                    f"{row['image'].shape[1]}x{row['image'].shape[2]}x{row['image'].shape[0]}, "
                    f"its manifest says {manifest.image_size}x{manifest.image_size}x"
                    f"{manifest.channels}: the shard does not belong to this manifest; rerun "
                    "the stage that wrote it")
        return rows

    paths = shard_paths(storage, directory, manifest)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
        rows = [row for part in pool.map(shard_rows, paths) for row in part]
    if not rows:
        raise InputError(f"{storage.uri_of(directory)} holds no samples; add data")
    return {"image": torch.from_numpy(np.stack([r["image"] for r in rows])),
            "label": torch.tensor([r["label"] for r in rows], dtype=torch.int64),
            "order": torch.tensor([r["order"] for r in rows], dtype=torch.int64)}


def training_set(storage: Storage, directory: str, num_workers: int, cache_mb: float,
                 hint: str = "run `oodscale prepare`") -> tuple[Any, Manifest]:
    """What a training worker group reads one shard set from, and its manifest: a
    `CachedShards` when a worker's share fits `cache_mb`, else a Ray Dataset to stream.
    Either way the shards are checked here, so a damaged one fails before workers start."""
    manifest, paths = _checked_shards(storage, directory, hint)
    if not rows_fit_in_cache(manifest, num_workers, cache_mb):
        return _ray_dataset(storage, paths, manifest), manifest
    return CachedShards(storage.uri, directory), manifest


class RankData:
    """This worker's rows of one dataset, as endless full batches on its device.

    Small datasets (`CachedShards`) are read once, kept on the device (uint8) and reshuffled
    each pass, so a run reads them once however many epochs and grid cells it trains. Every
    worker reads such a set whole, sorts it by `sample_order` and keeps every `world`-th row
    from its rank: which rows a rank trains on, and in what order, never depends on read
    timing, so training is reproducible bit for bit. Large ones stream through one endless
    iterator per worker (Ray Train's split of a Ray Dataset), which every cell of the run
    continues, so no split is ever left half-read.
    """

    def __init__(self, source: CachedShards | Any, device: torch.device | str, rank: int = 0,
                 world: int = 1) -> None:
        self.source, self.device = source, device
        self.cached = isinstance(source, CachedShards)
        self.rank, self.world = rank, world
        self._rows: dict[str, torch.Tensor] | None = None
        self._stream: Iterator[dict[str, torch.Tensor]] | None = None
        self._stream_batch_size = 0

    def _load(self) -> dict[str, torch.Tensor]:
        if self._rows is None:
            rows = self.source.read()
            mine = rows.pop("order").argsort()[self.rank::self.world]
            if not len(mine):
                raise InputError(f"this dataset has fewer rows than the {self.world} workers; "
                                 "lower the number of workers or add data")
            self._rows = {k: v[mine].to(self.device) for k, v in rows.items()}
        return self._rows

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Full batches forever; cached rows come in an order drawn from `seed` alone."""
        if not self.cached:
            if self._stream is None:
                self._stream = endless_batches(self.source, batch_size, seed, self.device)
                self._stream_batch_size = batch_size
            elif batch_size != self._stream_batch_size:
                raise InputError(f"this dataset streams batches of {self._stream_batch_size}; "
                                 f"a cell asked for {batch_size}")
            return self._stream
        return reshuffled_batches(self._load(), batch_size, seed)


def worker_data(config: dict[str, Any], device: torch.device | str) -> dict[str, RankData]:
    """Inside a Ray Train worker: each dataset `run_trainer` was given, as this rank's
    `RankData` (cached sets from `config["cached"]`, streamed ones from Ray Train's split)."""
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    data = {name: RankData(source, device, rank, world)
            for name, source in config["cached"].items()}
    for name in config["streamed"]:
        data[name] = RankData(ray.train.get_dataset_shard(name), device, rank, world)
    return data


def reshuffled_batches(rows: dict[str, torch.Tensor], batch_size: int, seed: int,
                       ) -> Iterator[dict[str, torch.Tensor]]:
    """Full batches of rows kept in memory, forever, reshuffled each pass from `seed` alone."""
    n = len(rows["label"])
    if n < batch_size:
        raise InputError(f"this rank's data split has {n} rows, fewer than one batch of "
                         f"{batch_size}; lower the batch size or the number of workers")
    gen = torch.Generator().manual_seed(seed)  # host: the order is the same on CPU and GPU
    while True:
        order = torch.randperm(n, generator=gen).to(rows["label"].device)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield {k: v[idx] for k, v in rows.items()}


def _mix(batches: list[dict[str, torch.Tensor]], gen: torch.Generator,
         ) -> Iterator[dict[str, torch.Tensor]]:
    size = len(batches[0]["label"])
    joined = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    order = torch.randperm(len(joined["label"]), generator=gen).to(joined["label"].device)
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        yield {k: v[idx] for k, v in joined.items()}
