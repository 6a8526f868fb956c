"""`oodscale predict CONFIG --run RUN PATH...`: score image files and folders with a trained,
calibrated classifier and write one row per image (path, score, is_ood, predicted class).

Folders are listed, then read, decoded and scored a batch at a time, so a folder far larger
than memory streams through; rows go to the output file batch by batch, which appears under its
name only when every image was scored.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from oodscale.config import ExperimentConfig
from oodscale.data.sources import IMAGE_SUFFIXES, image_files
from oodscale.runtime import RunLayout, open_storage


@dataclass(frozen=True)
class PredictRequest:
    """What the command line asked for beyond the config."""

    run: str | None
    score: str | None
    out: str
    paths: list[str]


def iter_image_paths(paths: list[str]) -> Iterator[str]:
    """Every image a path names: a file as given, a folder's images (recursive, sorted)."""
    for path in paths:
        storage = open_storage(path)
        info = storage.fs.get_file_info(storage.base)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{path} not found")
        if info.type == pafs.FileType.Directory:
            found = image_files(storage, storage.base)
            if not found:
                raise ValueError(f"folder {path} holds no images with suffixes "
                                 f"{sorted(IMAGE_SUFFIXES)}")
            yield from (storage.open_uri(p) for p in found)
        else:
            yield storage.open_uri(storage.base)


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def resolve_run(cfg: ExperimentConfig, layout: RunLayout, run: str | None) -> str:
    """The classifier directory of `run`; an unknown one is an error listing the trained."""
    from oodscale.classify.checkpoints import trained_runs

    storage = layout.storage
    trained = trained_runs(storage, layout.classifiers_dir)
    if run in trained:
        return layout.classifier_dir(run)
    have = ", ".join(trained) if trained else "none yet: run `oodscale train` first"
    asked = f"run {run!r} is not" if run else "--run is required:"
    raise ValueError(f"{asked} a trained classifier of experiment {cfg.name} under "
                     f"{storage.uri_of(layout.classifiers_dir)}; trained: {have}")


def predict(cfg: ExperimentConfig, layout: RunLayout, request: PredictRequest) -> str:
    """Score every image of `request.paths`, write the rows to `request.out` (.csv or
    .parquet), and say what was found."""
    from oodscale.detector import Detector, training_images

    if not request.paths:
        raise ValueError("give at least one image file or folder to score")
    directory = resolve_run(cfg, layout, request.run)
    detector = Detector.load(layout.storage.open_uri(directory), request.score,
                             batch_size=cfg.evaluate.batch_size)
    out = Path(request.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")
    schema = pa.schema([("path", pa.string()), ("score", pa.float64()),
                        ("is_ood", pa.bool_()), ("pred", pa.string())])
    writer_type = pq.ParquetWriter if out.suffix == ".parquet" else pacsv.CSVWriter
    total = flagged = 0
    shown: list[str] = []
    size = (detector.image_size, detector.channels)
    try:
        with writer_type(str(tmp), schema) as writer, ThreadPoolExecutor(4) as pool:
            for chunk in _chunks(iter_image_paths(request.paths), detector.batch_size):
                # decoding in threads (PIL releases the GIL); one image per call
                images = np.concatenate(list(pool.map(
                    lambda p: training_images([p], *size), chunk)))
                result = detector.predict_prepared(images)
                names = [detector.class_names[i] for i in result.pred]
                writer.write_table(pa.table({"path": chunk, "score": result.score,
                                             "is_ood": result.is_ood, "pred": names},
                                            schema=schema))
                total += len(chunk)
                flagged += int(result.is_ood.sum())
                shown += [f"  {'OOD' if o else 'ID '} {s:10.4f}  {n:>6}  {p}" for p, s, o, n
                          in zip(chunk, result.score, result.is_ood, names, strict=True)
                          ][:max(0, 10 - len(shown))]
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    more = f"\n  ... {total - len(shown)} more" if total > len(shown) else ""
    return (f"{detector.describe()}\n" + "\n".join(shown) + more +
            f"\n{flagged} of {total} images flagged OOD ({100 * flagged / total:.1f}%); "
            f"rows in {out}")
