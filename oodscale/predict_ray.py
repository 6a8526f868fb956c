"""`oodscale predict` at cluster scale: Ray Data batch inference over a large folder or bucket.

The driver lists the files (the same walk as the single-process path: no link out of a folder,
no loop) and cuts the sorted list into parts of `PART_FILES` files. Ray Data then reads and
decodes the files in tasks and scores them in an actor pool of `evaluate.concurrency` actors
(one GPU each on a GPU cluster), each loading the detector once. Rows come back to the driver
(a few numbers each, never images), which writes each part to `<out>/part-%06d.parquet` as soon
as all its rows are in (temp name, then rename) and `<out>/_SUCCESS.json` last. A rerun with
the same inputs and `--out` skips the parts already written, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from oodscale.config import ExperimentConfig
from oodscale.data.images import BadImageError, ImageLimits, decode_to_size, read_image_bytes
from oodscale.runtime import RunLayout, Storage

PART_FILES = 4096  # files per output part: the unit a rerun skips
DONE = "_SUCCESS.json"
DECODERS_PER_ACTOR = 4  # decode tasks in flight per scoring actor


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def parts_dir(out: Path) -> Path:
    """The directory of the parts: `--out` itself, or for `rows.csv` / `rows.parquet` the
    directory `rows/` beside it."""
    return out.with_suffix("") if out.suffix in (".csv", ".parquet") else out


def decode_files(batch: dict[str, np.ndarray], storages: list[Storage], size: int,
                 channels: int, limits: ImageLimits) -> dict[str, Any]:
    """Ray Data task: read and decode each listed file (C×H×W uint8, as `training_images`
    does, without importing torch), or say why not (its `error`; the image is zeros and is
    not scored)."""
    images = np.zeros((len(batch["path"]), channels, size, size), np.uint8)
    errors = []
    for i, (root, path) in enumerate(zip(batch["root"], batch["path"], strict=True)):
        file = storages[int(root)].at(str(path))
        try:
            data = read_image_bytes(file, file.base, limits, file.uri)
            images[i] = decode_to_size(data, size, channels, file.uri, limits).transpose(2, 0, 1)
            errors.append("")
        except BadImageError as err:
            errors.append(str(err))
        except OSError as err:  # unreadable: permissions, I/O, a file gone since the listing
            errors.append(f"cannot read image {file.uri}: {err}")
    return {"part": batch["part"], "path": batch["uri"], "image": images,
            "error": np.asarray(errors, dtype=object)}


class ScoreFiles:
    """Ray Data callable class: the detector loaded once per actor, scoring decoded files."""

    def __init__(self, classifier: Storage, score: str | None, batch_size: int,
                 use_gpu: bool) -> None:
        from oodscale.detector import Detector

        self.detector = Detector.load(classifier, score, use_gpu=use_gpu, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        score = np.full(len(ok), np.nan)
        is_ood = np.zeros(len(ok), bool)
        pred = np.full(len(ok), "", dtype=object)
        if ok.any():
            result = self.detector.predict_prepared(batch["image"][ok])
            score[ok], is_ood[ok] = result.score, result.is_ood
            pred[ok] = [self.detector.class_names[int(i)] for i in result.pred]
        return {"part": batch["part"], "path": batch["path"], "score": score, "is_ood": is_ood,
                "pred": pred, "error": batch["error"]}


def _part_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    rows = sorted(rows, key=lambda r: r["path"])
    bad = [bool(r["error"]) for r in rows]
    return pa.table({
        "path": [r["path"] for r in rows],
        "score": [None if b else float(r["score"]) for r, b in zip(rows, bad, strict=True)],
        "is_ood": [None if b else bool(r["is_ood"]) for r, b in zip(rows, bad, strict=True)],
        "pred": [None if b else str(r["pred"]) for r, b in zip(rows, bad, strict=True)],
        "error": [r["error"] or None for r in rows]}, schema=schema)


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def predict_with_ray(cfg: ExperimentConfig, layout: RunLayout, request: Any,
                     files: list[Storage], classifier: Storage, skipped: list[str],
                     size: tuple[int, int], schema: pa.Schema) -> str:
    """Score `files` (pairs from predict's listing) with Ray Data into Parquet parts of
    `schema` (predict's rows) under `request.out`; returns the summary. A part already
    written is skipped."""
    import ray.data

    from oodscale.runtime import init_ray, require_gpus, resolve_use_gpu

    out = parts_dir(Path(request.out))
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg, request.address)
    ev = cfg.evaluate
    use_gpu = resolve_use_gpu(ev.use_gpu)
    if use_gpu:
        require_gpus(ev.concurrency, "evaluate.concurrency")
    roots = list({id(f.fs): f for f in files}.values())  # one Storage per filesystem
    index = {id(r.fs): k for k, r in enumerate(roots)}
    parts = [files[s:s + PART_FILES] for s in range(0, len(files), PART_FILES)]
    todo = [i for i in range(len(parts)) if not (out / part_name(i)).exists()]
    (out / DONE).unlink(missing_ok=True)
    items = [{"part": i, "root": index[id(f.fs)], "path": f.base, "uri": f.uri}
             for i in todo for f in parts[i]]
    pending = {i: len(parts[i]) for i in todo}
    rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    stop = None
    if items:
        # Decoding runs in tasks of half an actor's CPUs: other resources than the actors', so
        # Ray Data does not fuse it into them (a GPU actor would wait on PIL); at most
        # DECODERS_PER_ACTOR at a time per actor, so the worker processes (and memory) stay
        # as many however many files there are.
        decoded = ray.data.from_items(items).map_batches(
            decode_files, batch_size=ev.batch_size, num_cpus=ev.cpus_per_actor / 2,
            concurrency=DECODERS_PER_ACTOR * ev.concurrency,
            fn_kwargs={"storages": roots, "size": size[0], "channels": size[1],
                       "limits": ImageLimits.from_config(cfg.data)})
        scored = decoded.map_batches(
            ScoreFiles, batch_size=ev.batch_size, num_cpus=ev.cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
            compute=ray.data.ActorPoolStrategy(size=ev.concurrency),
            fn_constructor_kwargs={"classifier": classifier, "score": request.score,
                                   "batch_size": ev.batch_size, "use_gpu": use_gpu})
        for batch in scored.iter_rows():
            if batch["error"] and not request.skip_bad:
                stop = BadImageError(batch["error"])
                break
            part = int(batch["part"])
            rows[part].append(batch)
            if len(rows[part]) == pending[part]:
                _write_atomic(_part_table(rows.pop(part), schema), out / part_name(part))
    written = sorted(out.glob("part-*.parquet"))
    if stop is not None:
        raise BadImageError(f"{stop}; the {len(written)} part(s) written before it are kept in "
                            f"{out} and a rerun resumes from them. Rerun with --skip-bad to "
                            f"score every readable file and list unreadable ones as rows with "
                            f"an `error`")
    tables = [pq.read_table(p, columns=["is_ood", "error"]) for p in written]
    scored_n = sum(t["error"].null_count for t in tables)
    flagged = sum(int(pc.sum(t["is_ood"]).as_py() or 0) for t in tables)
    bad = sum(t.num_rows for t in tables) - scored_n
    (out / DONE).write_text(json.dumps({"parts": len(parts), "files": len(files),
                                        "scored": scored_n, "unreadable": bad}, indent=2))
    lines = [f"Ray Data: {len(todo)} of {len(parts)} part(s) scored now "
             f"({len(parts) - len(todo)} already written), evaluate.concurrency="
             f"{ev.concurrency} actor(s) on {'GPU' if use_gpu else 'CPU'}",
             f"{flagged} of {scored_n} images flagged OOD "
             f"({100 * flagged / max(scored_n, 1):.1f}%)"]
    if bad:
        lines.append(f"{bad} file(s) could not be read (rows with an `error`)")
    return "\n".join([*lines, *skipped, f"rows in {out}/part-*.parquet"])
