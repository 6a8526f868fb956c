"""Ray Train plumbing shared by the DDPM and classifier stages.

Both stages run a `TorchTrainer` whose loop builds an Accelerate `Accelerator` (which picks up
the process group Ray Train set up), prepares model and optimizer only, streams Ray Data shards,
and reports checkpoints from rank 0 while every rank reports metrics (Ray Train V2).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from oodscale.config import WorkerConfig
from oodscale.data.streams import CachedShards
from oodscale.errors import MissingError
from oodscale.progress import publish
from oodscale.runtime import RunLayout, Storage, check_write_guards, resolve_use_gpu

STATE_FILE = "state.json"
# How often Ray Train's controller polls its workers (Ray's default: 2 s). Every step of a worker
# group's life waits for a poll: starting, each report's synchronisation, the end of the loop.
# At 0.5 s a one-worker group that only reports takes 8.8-8.9 s instead of 11.5-12.1 s on the
# 2-core machine (`bench/bench_ray_overhead.py --cases startup`, docs/benchmarks.md); the polls
# themselves are one small RPC per worker. Set the variable before `oodscale` runs to choose
# another interval.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.5"


def make_worker_accelerator(workers: WorkerConfig, use_gpu: bool):
    """The Accelerator of a Ray Train worker, with the worker's torch thread count set first."""
    import torch

    if workers.torch_threads is not None:
        torch.set_num_threads(workers.torch_threads)
    return make_accelerator(workers.mixed_precision, use_gpu)


def prepare(accelerator, model, optimizer):
    """Accelerate's `prepare` of model and optimizer, without DistributedDataParallel on a
    single worker: Ray Train sets up a process group even for one worker, and DDP's gradient
    hooks then cost ~5 % of a small model's step for nothing."""
    from torch.nn.parallel import DistributedDataParallel

    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.num_processes == 1 and isinstance(model, DistributedDataParallel):
        model = model.module
    return model, optimizer


def make_accelerator(mixed_precision: str, use_gpu: bool):
    """An Accelerator inside a Ray Train worker; bf16 on GPU is the scale-out setting.

    fp16 needs a GPU, so a CPU worker asked for fp16 trains in fp32 instead.
    """
    from accelerate import Accelerator

    precision = "no" if (mixed_precision == "fp16" and not use_gpu) else mixed_precision
    return Accelerator(mixed_precision=precision, cpu=not use_gpu)


def run_trainer(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
                datasets: dict[str, Any], workers: WorkerConfig, layout: RunLayout,
                name: str):
    """Fit a TorchTrainer; a rerun with the same name resumes from its last checkpoint.

    `datasets` maps a name to what `data.streams.training_set` returned: a `CachedShards`
    reaches every worker whole, through the loop's config, and the worker reads it and slices
    its own rows; a Ray Dataset is split across the workers by Ray Train. The loop gets both
    as `data.streams.worker_data(config, device)`."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train hands this variable from the driver to its controller and workers
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL_S)
    use_gpu = resolve_use_gpu(workers.use_gpu)
    resources = {"CPU": workers.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    storage = layout.storage
    cached = {n: d for n, d in datasets.items() if isinstance(d, CachedShards)}
    streamed = {n: d for n, d in datasets.items() if n not in cached}
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "cached": cached, "streamed": sorted(streamed),
                           "use_gpu": use_gpu},
        scaling_config=ray.train.ScalingConfig(num_workers=workers.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=layout.ray_train_dir, storage_filesystem=storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=1)),
        datasets=streamed,
    )
    return trainer.fit()


@contextmanager
def resumed_state() -> Iterator[tuple[Path | None, dict[str, Any]]]:
    """The latest checkpoint's directory and its state (epoch, step), or (None, {})."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None, {}
        return
    with checkpoint.as_directory() as directory:
        path = Path(directory)
        yield path, json.loads((path / STATE_FILE).read_text())


def report(metrics: dict[str, Any], accelerator, write: Callable[[Path], None] | None,
           label: str = "", state: dict[str, Any] | None = None) -> None:
    """Rank 0 prints an epoch's metrics (to the worker log; on the terminal with --verbose) and
    publishes them to the driver's stage bar and tracking (oodscale.progress). With `write` (a
    checkpoint epoch, on every rank), every rank reports them to Ray Train and rank 0 writes
    and attaches a checkpoint whose state file holds the metrics plus `state` (what a resume
    needs to know).

    Only checkpoint epochs go to Ray Train: a report synchronises every worker with the
    controller, which cost 0.6-1.5 s per epoch on the 2-core machine at Ray's 2 s poll
    interval (HEALTH_CHECK_ENV), more than a digits epoch.
    """
    import ray.train

    if accelerator.is_main_process:
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items())
        print(f"[oodscale] {label}{': ' if label else ''}{shown}", flush=True)
        publish(label, metrics)
    if write is None:
        return
    if not accelerator.is_main_process:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory)
        write(path)
        (path / STATE_FILE).write_text(json.dumps({**metrics, **(state or {})}, sort_keys=True))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def copy_checkpoint(result, layout: RunLayout, destination: str, part: str = "") -> None:
    """Publish the trainer's final checkpoint (or its folder `part`) at `destination` (local
    or remote); the caller writes the card that says it is finished afterwards."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; see the worker logs "
                           "(worker-*.out in the Ray log directory named at the start, or "
                           "rerun with --verbose)")
    source = f"{result.checkpoint.path}/{part}" if part else result.checkpoint.path
    publish_dir(layout.storage, source, destination, result.checkpoint.filesystem)


def publish_dir(storage: Storage, source: str, destination: str,
                source_fs: pafs.FileSystem | None = None, last: tuple[str, ...] = ()) -> None:
    """Copy a directory's files to `destination` in storage, the files named in `last` (its
    card) after every other one.

    No directory is moved (pyarrow's S3 and GCS filesystems cannot move one): files are written
    under their final names. A card already at `destination` is deleted before anything else
    changes there and written last (whole, in one write), so a reader that checks the card sees
    either no model or a complete one, never a half-published one; a publish killed midway
    leaves a directory without its card, which readers treat as absent and a rerun replaces.
    """
    check_write_guards()  # a driver that lost its experiment lock publishes nothing
    source_fs = source_fs or pafs.LocalFileSystem()
    base = source.rstrip("/")
    try:
        names = sorted(info.path[len(base) + 1:] for info in source_fs.get_file_info(
            pafs.FileSelector(base, recursive=True)) if info.type == pafs.FileType.File)
        cards = [name for name in last if name in names]
        if len(cards) != len(last):
            raise MissingError(f"{base} lacks {sorted(set(last) - set(cards))}")
        if storage.exists(destination):
            for name in last:  # first: from here on the destination is not a finished model
                if storage.exists(f"{destination}/{name}"):
                    storage.fs.delete_file(f"{destination}/{name}")
            storage.fs.delete_dir_contents(destination)
        storage.makedirs(destination)
        for name in (n for n in names if n not in last):
            if "/" in name:
                storage.makedirs(f"{destination}/{name.rsplit('/', 1)[0]}")
            pafs.copy_files(f"{base}/{name}", f"{destination}/{name}",
                            source_filesystem=source_fs, destination_filesystem=storage.fs)
    except OSError as err:  # full or read-only root: what is there has no card
        raise storage.write_error(destination, err) from err
    for name in cards:
        with source_fs.open_input_stream(f"{base}/{name}") as f:
            storage.write_bytes_atomic(f"{destination}/{name}", f.read())
