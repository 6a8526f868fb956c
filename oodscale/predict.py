"""`oodscale predict CONFIG --run RUN PATH...`: score image files and folders with a trained,
calibrated classifier and write one row per image (path, score, is_ood, predicted class, and
`error`: empty, or with `--skip-bad` why the file could not be read).

Folders are listed, then read, decoded and scored a batch at a time, so a folder far larger
than memory streams through; rows go to the output file batch by batch, which appears under its
name only when every file was scored (or, with `--skip-bad`, listed with its error). A run
stopped by an unreadable file keeps the rows before it in `<out stem>.partial<suffix>`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from oodscale.config import ExperimentConfig
from oodscale.data.images import (
    IMAGE_SUFFIXES,
    BadImageError,
    ImageLimits,
    iter_folder,
    list_folder,
)
from oodscale.errors import InputError
from oodscale.predict_inputs import no_images, open_argument
from oodscale.runtime import RunLayout, Storage


@dataclass(frozen=True)
class PredictRequest:
    """What the command line asked for beyond the config."""

    run: str | None
    score: str | None
    out: str
    paths: list[str]
    skip_bad: bool = False  # an unreadable file is a row with its `error`, not the end
    engine: str = "auto"  # local (one process), ray (Ray Data), auto: ray above RAY_MIN_FILES
    address: str | None = None  # the Ray cluster of the ray engine (else as every stage)


RAY_MIN_FILES = 20_000  # auto: more files than this are scored with Ray Data (predict_ray)


def iter_image_paths(paths: list[str], skipped: list[str] | None = None) -> Iterator[Storage]:
    """Every image a path names, as a (filesystem, path) pair (a Storage based at the file,
    never a URI to parse again): a file as given, a folder's images (recursive, sorted; what a
    folder holds beside them is said in lines appended to `skipped`)."""
    for path in paths:
        storage, folder = open_argument(path)
        if folder:
            listing = list_folder(storage, storage.base)
            if not listing.files:
                raise no_images(path, listing.skipped())
            if skipped is not None:
                skipped += [f"{path}: {line}" for line in listing.skipped()]
            yield from (storage.at(p) for p in listing.files)
        else:
            yield storage


def more_images_than(paths: list[str], limit: int) -> bool:
    """Whether `paths` name more than `limit` images, walking no further than that (on local
    disk): `--engine auto` decides without the driver listing a large folder whole."""
    count = 0
    for path in paths:
        storage, folder = open_argument(path)
        found = (p for kind, p in iter_folder(storage, storage.base) if kind == "file"
                 and Path(p).suffix.lower() in IMAGE_SUFFIXES) if folder else [storage.base]
        for _ in found:
            count += 1
            if count > limit:
                return True
    return False


def _chunks(items: Iterator[Storage], size: int) -> Iterator[list[Storage]]:
    chunk: list[Storage] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def resolve_run(cfg: ExperimentConfig, layout: RunLayout, run: str | None) -> str:
    """The classifier directory of `run`; an unknown one is an error listing the trained."""
    from oodscale.classify.cards import trained_runs

    storage = layout.storage
    trained = trained_runs(storage, layout.classifiers_dir)
    if run in trained:
        return layout.classifier_dir(run)
    have = ", ".join(trained) if trained else "none yet: run `oodscale train` first"
    asked = f"run {run!r} is not" if run else "--run is required:"
    raise InputError(f"{asked} a trained classifier of experiment {cfg.name} under "
                     f"{storage.uri_of(layout.classifiers_dir)}; trained: {have}")


ROW_SCHEMA = pa.schema([("path", pa.string()), ("score", pa.float64()), ("is_ood", pa.bool_()),
                        ("pred", pa.string()), ("error", pa.string())])


def _decode_all(pool: ThreadPoolExecutor, chunk: list[Storage], size: tuple[int, int],
                limits: ImageLimits) -> list[np.ndarray | BadImageError]:
    """Each file of `chunk` decoded (C×H×W uint8), or the error that says why it is not."""
    from oodscale.detector import training_images

    def one(file: Storage) -> np.ndarray | BadImageError:
        try:
            return training_images([file], *size, limits)[0]
        except BadImageError as err:
            return err
        except OSError as err:  # unreadable: permissions, I/O, a file gone since the listing
            return BadImageError(f"cannot read image {file.uri}: {err}")

    return list(pool.map(one, chunk))  # decoding in threads (PIL releases the GIL)


@dataclass
class _Tally:
    scored: int = 0
    flagged: int = 0
    bad: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)


def _score_rows(detector: Any, chunk: list[Storage],
                decoded: list[np.ndarray | BadImageError], tally: _Tally) -> dict[str, list[Any]]:
    """The output rows of `chunk`: the decoded images scored in one batch, the others rows
    with their `error`."""
    rows: dict[str, list[Any]] = {name: [None] * len(chunk) for name in ROW_SCHEMA.names}
    rows["path"] = [file.uri for file in chunk]
    good = [i for i, d in enumerate(decoded) if not isinstance(d, BadImageError)]
    if good:
        result = detector.predict_prepared(np.stack([decoded[i] for i in good]))
        for j, i in enumerate(good):
            rows["score"][i] = float(result.score[j])
            rows["is_ood"][i] = bool(result.is_ood[j])
            rows["pred"][i] = detector.class_names[int(result.pred[j])]
        tally.scored += len(good)
        tally.flagged += int(result.is_ood.sum())
    for i, d in enumerate(decoded):
        if isinstance(d, BadImageError):
            rows["error"][i] = str(d)
            tally.bad.append(chunk[i].uri)
    for path, score, is_ood, pred, error in zip(*rows.values(), strict=True):
        if len(tally.shown) < 10:
            tally.shown.append(f"  ERR {'':10}  {'':>6}  {path}" if error else
                               f"  {'OOD' if is_ood else 'ID '} {score:10.4f}  {pred:>6}  {path}")
    return rows


def partial_path(out: Path) -> Path:
    """Where the rows scored before an unreadable file stopped a run are kept."""
    return out.with_name(f"{out.stem}.partial{out.suffix}")


def _stopped(err: BadImageError, scored: int, tmp: Path, out: Path) -> BadImageError:
    """The error of a run stopped at an unreadable file, the rows before it kept aside."""
    kept = "nothing was scored before it"
    if scored:
        os.replace(tmp, partial_path(out))
        kept = f"the {scored} image(s) scored before it are kept in {partial_path(out)}"
    return BadImageError(f"{err}; {kept}. Rerun with --skip-bad to score every readable file "
                         f"and list unreadable ones as rows with an `error`")


def predict(cfg: ExperimentConfig, layout: RunLayout, request: PredictRequest) -> str:
    """Score every image of `request.paths`, write the rows to `request.out` (.csv or
    .parquet), and say what was found and what was skipped.

    An unreadable file stops the run naming it, the rows scored before it kept in
    `partial_path(out)`; with `request.skip_bad` it is a row with its `error` instead."""
    from oodscale.detector import Detector

    if not request.paths:
        raise InputError("give at least one image file or folder to score")
    directory = resolve_run(cfg, layout, request.run)
    detector = Detector.load(layout.storage.at(directory), request.score,
                             batch_size=cfg.evaluate.batch_size,
                             limits=ImageLimits.from_config(cfg.data))
    size = (detector.image_size, detector.channels)
    engine = request.engine
    if engine == "auto":
        engine = "ray" if more_images_than(request.paths, RAY_MIN_FILES) else "local"
    if engine == "ray":
        from oodscale.predict_ray import predict_with_ray

        return "\n".join([detector.describe(), predict_with_ray(
            cfg, request, layout.storage.at(directory), size, ROW_SCHEMA)])
    skipped: list[str] = []
    files = iter_image_paths(request.paths, skipped)
    out = Path(request.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")
    writer_type = pq.ParquetWriter if out.suffix == ".parquet" else pacsv.CSVWriter
    tally = _Tally()
    stop: BadImageError | None = None
    try:
        with writer_type(str(tmp), ROW_SCHEMA) as writer, ThreadPoolExecutor(4) as pool:
            for chunk in _chunks(files, detector.batch_size):
                decoded = _decode_all(pool, chunk, size, detector.limits)
                first = next((i for i, d in enumerate(decoded) if isinstance(d, BadImageError)),
                             None)
                if first is not None and not request.skip_bad:
                    stop, chunk, decoded = decoded[first], chunk[:first], decoded[:first]
                if chunk:
                    writer.write_table(pa.table(_score_rows(detector, chunk, decoded, tally),
                                                schema=ROW_SCHEMA))
                if stop is not None:
                    break
        if stop is not None:
            raise _stopped(stop, tally.scored, tmp, out)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    rows = tally.scored + len(tally.bad)
    lines = [detector.describe(), *tally.shown]
    if rows > len(tally.shown):
        lines.append(f"  ... {rows - len(tally.shown)} more")
    lines.append(f"{tally.flagged} of {tally.scored} images flagged OOD "
                 f"({100 * tally.flagged / max(tally.scored, 1):.1f}%)")
    if tally.bad:
        more = f", ... {len(tally.bad) - 5} more" if len(tally.bad) > 5 else ""
        lines.append(f"{len(tally.bad)} file(s) could not be read (rows with an `error`): "
                     f"{', '.join(tally.bad[:5])}{more}")
    return "\n".join([*lines, *skipped, f"rows in {out}"])
