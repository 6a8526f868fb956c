"""What the readers' shard check costs: sha256 per MB against reading the same shards.

    .venv/bin/python bench/bench_checksums.py    # 64 shards of ~4 MB of pixels, 3 rounds
    .venv/bin/python bench/bench_checksums.py --shards 16 --mb 2

Every reader (`shard_paths`) checks each listed shard's size (a stat) and sha256 (one read) once
per process before it hands the paths on. This writes real shards of random 32x32 RGB PNGs in a
temporary directory and times, per round (median of the rounds, min-max beside it):
  - the first check: stat + sha256 of every shard (the once-per-job cost),
  - a repeat check in the same process: stats only (the cache hit),
  - decoding every sample (`iter_samples`: tar + PNG + JSON), what a training pass does anyway.
The page cache holds the files after the first round, so these are CPU costs, not disk reads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np

from oodscale.data import shards
from oodscale.data.shards import Manifest, iter_samples, shard_paths, write_split
from oodscale.runtime import open_storage


def _write(root: str, num_shards: int, mb: float) -> tuple:
    storage = open_storage(root)
    per_shard = max(1, int(mb * 2**20 / (32 * 32 * 3 + 700)))  # random PNGs barely compress
    n = num_shards * per_shard
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    manifest = write_split(storage, storage.path("d"), "bench", images,
                           [{"label": i % 10} for i in range(n)], per_shard,
                           Manifest(kind="id", split="bench", image_size=32, channels=3,
                                    class_names=[str(i) for i in range(10)]))
    return storage, storage.path("d"), manifest


def _median(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--mb", type=float, default=4.0, help="MB per shard")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage, directory, manifest = _write(tmp, args.shards, args.mb)
        total_mb = sum(s.size for s in manifest.shards) / 2**20
        first, again, decode = [], [], []
        for _ in range(args.rounds):
            shards._CHECKED.clear()  # a fresh job
            started = time.perf_counter()
            paths = shard_paths(storage, directory, manifest)
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            shard_paths(storage, directory, manifest)
            again.append(time.perf_counter() - started)
            started = time.perf_counter()
            for path in paths:
                for _ in iter_samples(storage, path):
                    pass
            decode.append(time.perf_counter() - started)
    rate = total_mb / statistics.median(first)
    print(f"## bench_checksums: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
          f"`{shlex.join(['python', 'bench/bench_checksums.py', *sys.argv[1:]])}` on "
          f"{platform.node()} ({platform.processor() or platform.machine()}), "
          f"{manifest.num_samples} samples in {len(manifest.shards)} shards, "
          f"{total_mb:.0f} MB, median of {args.rounds} rounds (min-max)\n\n"
          f"| what | time | per MB |\n|---|---|---|\n"
          f"| first check (stat + sha256) | {_median(first)} | "
          f"{1000 * statistics.median(first) / total_mb:.2f} ms ({rate:.0f} MB/s) |\n"
          f"| repeat check, same process (stat) | {_median(again)} | "
          f"{1000 * statistics.median(again) / total_mb:.3f} ms |\n"
          f"| decode every sample (tar + PNG + JSON) | {_median(decode)} | "
          f"{1000 * statistics.median(decode) / total_mb:.2f} ms |\n\n"
          f"The check costs {100 * statistics.median(first) / statistics.median(decode):.1f} % of "
          f"one decoding pass over the same shards.")


if __name__ == "__main__":
    main()
