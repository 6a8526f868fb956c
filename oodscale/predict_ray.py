"""`oodscale predict` at cluster scale: Ray Data batch inference over a large folder or bucket.

The driver names only the paths it was given; Ray Data tasks list them (oodscale.predict_listing:
the link-safe walk, a task per subdirectory, files sorted and cut into parts of `PART_FILES`
named by subtree and index), read and decode the files, and an actor pool of
`evaluate.concurrency` actors (one GPU each on a GPU cluster), each loading the detector once,
scores them. Rows come back to the driver (a few numbers each, never images), which writes each
part to `<out>/part-<unit key>-<index>.parquet` as soon as all its rows are in (temp name, then
rename) and `<out>/_SUCCESS.json` last. The driver holds the rows of the parts not yet complete,
a few counts per argument and one name per part, never the file list; scoring actors pad their
batches to a few shapes (`padded`), so neither grows with the number of images.
A rerun with the same inputs and `--out` skips the parts already written, so an interrupted run
resumes.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from oodscale import predict_listing as listing
from oodscale.config import ExperimentConfig
from oodscale.data.images import (
    BadImageError,
    ImageLimits,
    decode_to_size,
    read_image_bytes,
    skipped_lines,
)
from oodscale.errors import InputError
from oodscale.predict_inputs import no_images
from oodscale.predict_listing import Root
from oodscale.runtime import Storage

DONE = "_SUCCESS.json"
DECODERS_PER_ACTOR = 4  # decode tasks in flight per scoring actor


def parts_dir(out: Path) -> Path:
    """The directory of the parts: `--out` itself, or for `rows.csv` / `rows.parquet` the
    directory `rows/` beside it."""
    return out.with_suffix("") if out.suffix in (".csv", ".parquet") else out


def decode_files(batch: dict[str, np.ndarray], roots: list[Root], size: int,
                 channels: int, limits: ImageLimits) -> dict[str, Any]:
    """Ray Data task: read and decode each listed file (C×H×W uint8, as `training_images`
    does, without importing torch), or say why not (its `error`; the image is zeros and is
    not scored). Note rows pass through undecoded."""
    images = np.zeros((len(batch["path"]), channels, size, size), np.uint8)
    errors = []
    for i, (root, path, note) in enumerate(zip(batch["root"], batch["path"], batch["note"],
                                               strict=True)):
        if note:
            errors.append("")
            continue
        file = roots[int(root)].storage.at(str(path))
        try:
            data = read_image_bytes(file, file.base, limits, file.uri)
            images[i] = decode_to_size(data, size, channels, file.uri, limits).transpose(2, 0, 1)
            errors.append("")
        except BadImageError as err:
            errors.append(str(err))
        except OSError as err:  # unreadable: permissions, I/O, a file gone since the listing
            errors.append(f"cannot read image {file.uri}: {err}")
    return {"part": batch["part"], "part_size": batch["part_size"], "path": batch["uri"],
            "image": images, "error": np.asarray(errors, dtype=object), "note": batch["note"]}


def padded(images: np.ndarray, batch_size: int) -> np.ndarray:
    """`images` padded with zeros to the next power of two (at most `batch_size`). The
    batches an actor gets vary in size (the end of a block, unreadable files left out), and
    torch's CPU kernels keep state for every batch shape they see: some 6 MB a shape for the
    digits model here, so an actor grew with the number of images. Padded, it sees at most
    log2(batch_size) + 1 shapes."""
    size = min(batch_size, 1 << (len(images) - 1).bit_length())
    if len(images) >= size:
        return images
    return np.concatenate([images, np.zeros((size - len(images), *images.shape[1:]),
                                            images.dtype)])


class ScoreFiles:
    """Ray Data callable class: the detector loaded once per actor, scoring decoded files."""

    def __init__(self, classifier: Storage, score: str | None, batch_size: int,
                 use_gpu: bool) -> None:
        from oodscale.detector import Detector

        self.detector = Detector.load(classifier, score, use_gpu=use_gpu, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ok = np.asarray([not e and not n for e, n in zip(batch["error"], batch["note"],
                                                         strict=True)], dtype=bool)
        score = np.full(len(ok), np.nan)
        is_ood = np.zeros(len(ok), bool)
        pred = np.full(len(ok), "", dtype=object)
        if ok.any():
            images = batch["image"][ok]
            result = self.detector.predict_prepared(padded(images, self.detector.batch_size))
            score[ok], is_ood[ok] = result.score[:len(images)], result.is_ood[:len(images)]
            pred[ok] = [self.detector.class_names[int(i)] for i in result.pred[:len(images)]]
        return {"part": batch["part"], "part_size": batch["part_size"], "path": batch["path"],
                "score": score, "is_ood": is_ood, "pred": pred, "error": batch["error"],
                "note": batch["note"]}


def _part_table(pieces: list[pa.Table], schema: pa.Schema) -> pa.Table:
    """One part's rows sorted by path, an unreadable file's score, is_ood and pred null and
    a scored file's error null."""
    rows = pa.concat_tables(pieces).sort_by("path")
    good = pc.equal(rows["error"], "")
    columns = {name: pc.if_else(good if name != "error" else pc.invert(good), rows[name],
                                pa.scalar(None, schema.field(name).type))
               for name in schema.names if name != "path"}
    return pa.table({"path": rows["path"], **columns}, schema=schema)


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class _Notes:
    """The listing tasks' notes summed: per argument its images and what was skipped (a few
    paths each), and the name of every part the inputs make (one name per `PART_FILES`)."""

    images: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    counts: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    examples: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    parts: list[str] = field(default_factory=list)
    done: int = 0

    def add(self, note: dict[str, Any]) -> None:
        where = note["argument"]
        self.images[where] += note["images"]
        for kind, paths in note["examples"].items():
            self.counts[where][kind] += note[kind]
            kept = sorted(self.examples[where][kind] + paths)
            self.examples[where][kind] = kept[:listing.EXAMPLES]
        self.parts += [listing.part_name(note["key"], i) for i in range(note["parts"])]
        self.done += note["done"]

    def skipped(self, argument: str) -> list[str]:
        return skipped_lines(self.counts[argument], self.examples[argument])


def _scored_rows(cfg: ExperimentConfig, request: Any, roots: list[Root], classifier: Storage,
                 size: tuple[int, int], done: frozenset[str], use_gpu: bool) -> Any:
    """The Ray Data pipeline: listing, decoding and scoring, rows and notes out."""
    import ray.data

    ev = cfg.evaluate
    # One unit a block, so subtrees are walked in parallel tasks; then blocks of one batch,
    # so a large unit's files are decoded by many tasks, not by the one that listed them.
    listed = (ray.data.from_items(listing.root_rows(roots))
              .flat_map(listing.units_of, fn_kwargs={"roots": roots})
              .repartition(target_num_rows_per_block=1)
              .map_batches(listing.files_of, batch_size=1,
                           fn_kwargs={"roots": roots, "done": done,
                                      "part_files": listing.PART_FILES})
              .repartition(target_num_rows_per_block=ev.batch_size))
    # Decoding runs in tasks of half an actor's CPUs: other resources than the actors', so
    # Ray Data does not fuse it into them (a GPU actor would wait on PIL); at most
    # DECODERS_PER_ACTOR at a time per actor, so the worker processes (and memory) stay as
    # many however many files there are.
    decoded = listed.map_batches(
        decode_files, batch_size=ev.batch_size, num_cpus=ev.cpus_per_actor / 2,
        compute=ray.data.TaskPoolStrategy(size=DECODERS_PER_ACTOR * ev.concurrency),
        fn_kwargs={"roots": roots, "size": size[0], "channels": size[1],
                   "limits": ImageLimits.from_config(cfg.data)})
    return decoded.map_batches(
        ScoreFiles, batch_size=ev.batch_size, num_cpus=ev.cpus_per_actor,
        num_gpus=1 if use_gpu else 0, compute=ray.data.ActorPoolStrategy(size=ev.concurrency),
        fn_constructor_kwargs={"classifier": classifier, "score": request.score,
                               "batch_size": ev.batch_size, "use_gpu": use_gpu})


def predict_with_ray(cfg: ExperimentConfig, request: Any, classifier: Storage,
                     size: tuple[int, int], schema: pa.Schema) -> str:
    """Score the images of `request.paths` with Ray Data into Parquet parts of `schema`
    (predict's rows) under `request.out`; returns the summary. A part already written is
    skipped."""
    from oodscale.runtime import init_ray, require_gpus, resolve_use_gpu

    out = parts_dir(Path(request.out))
    roots = listing.roots_of(request.paths)
    old = sorted(p.name for p in out.glob("part-[0-9][0-9][0-9][0-9][0-9][0-9].parquet"))
    if old:
        raise InputError(f"{out} holds parts named as before 2026-12-04 ({', '.join(old[:3])}"
                         f"{' …' if len(old) > 3 else ''}): a rerun would not resume from them "
                         f"and a reader of part-*.parquet would read their rows twice; remove "
                         f"them or give another --out")
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg, request.address)
    ev = cfg.evaluate
    use_gpu = resolve_use_gpu(ev.use_gpu)
    if use_gpu:
        require_gpus(ev.concurrency, "evaluate.concurrency")
    done = frozenset(p.name for p in out.glob("part-*.parquet"))
    (out / DONE).unlink(missing_ok=True)
    notes, pending, stop = _Notes(), defaultdict(list), None
    scored = _scored_rows(cfg, request, roots, classifier, size, done, use_gpu)
    for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
        for note in batch.filter(pc.not_equal(batch["note"], ""))["note"].to_pylist():
            notes.add(json.loads(note))
        rows = batch.filter(pc.equal(batch["note"], ""))
        errors = rows.filter(pc.not_equal(rows["error"], ""))
        if errors.num_rows and not request.skip_bad:
            stop = BadImageError(errors["error"][0].as_py())
            break
        for part in pc.unique(rows["part"]).to_pylist():
            piece = rows.filter(pc.equal(rows["part"], part))
            pending[part].append(piece)
            if sum(t.num_rows for t in pending[part]) == piece["part_size"][0].as_py():
                _write_atomic(_part_table(pending.pop(part), schema), out / part)
    written = [p for p in notes.parts if (out / p).exists()]
    if stop is not None:
        raise BadImageError(f"{stop}; the {len(written)} part(s) written before it are kept in "
                            f"{out} and a rerun resumes from them. Rerun with --skip-bad to "
                            f"score every readable file and list unreadable ones as rows with "
                            f"an `error`")
    empty = [r.argument for r in roots if r.folder and not notes.images[r.argument]]
    if empty:
        raise no_images(empty[0], notes.skipped(empty[0]))
    scored_n = flagged = rows_n = 0
    for part in written:  # one part's two columns at a time
        table = pq.read_table(out / part, columns=["is_ood", "error"])
        rows_n += table.num_rows
        scored_n += table["error"].null_count
        flagged += int(pc.sum(table["is_ood"]).as_py() or 0)
    bad = rows_n - scored_n
    (out / DONE).write_text(json.dumps({"parts": len(notes.parts), "files": rows_n,
                                        "scored": scored_n, "unreadable": bad}, indent=2))
    lines = [f"Ray Data: {len(notes.parts) - notes.done} of {len(notes.parts)} part(s) scored "
             f"now ({notes.done} already written), evaluate.concurrency={ev.concurrency} "
             f"actor(s) on {'GPU' if use_gpu else 'CPU'}",
             f"{flagged} of {scored_n} images flagged OOD "
             f"({100 * flagged / max(scored_n, 1):.1f}%)"]
    if bad:
        lines.append(f"{bad} file(s) could not be read (rows with an `error`)")
    skipped = [f"{r.argument}: {line}" for r in roots if r.folder
               for line in notes.skipped(r.argument)]
    return "\n".join([*lines, *skipped, f"rows in {out}/part-*.parquet"])
