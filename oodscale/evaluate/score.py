"""The evaluate stage: Ray Data scores every test sample under every classifier.

A `Scorer` actor loads one classifier once (and fits kNN / Mahalanobis statistics on the ID
training embeddings when asked), then maps batches of test images to per-score values. The
driver writes the long `scores.parquet`, aggregates `results.parquet`, and renders the report.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import torch

from oodscale.classify.checkpoints import CARD, LoadedClassifier
from oodscale.classify.grid import grid
from oodscale.classify.models import Activations
from oodscale.config import ExperimentConfig
from oodscale.data.shards import iter_samples, read_manifest, shard_paths, try_read_manifest
from oodscale.data.streams import read_shards
from oodscale.data.validation import VAL_SPLIT
from oodscale.diffusion.generators import MODEL_CARD
from oodscale.errors import InputError, MissingError
from oodscale.evaluate.detectors import ScoreSet, TrainFit, fit_train
from oodscale.evaluate.report import aggregate, write_report
from oodscale.evaluate.report_html import provenance
from oodscale.evaluate.score_table import POOD_PREFIX, needs_fit, pood_spec
from oodscale.outlier_sources import generator_sources, synthetic_dirname
from oodscale.progress import track
from oodscale.runtime import RunLayout, StorageRoot, open_storage, require_gpus, resolve_use_gpu

VAL_PREFIX = "val:"  # dataset names of validation rows while scoring; stripped when written


def fit_train_features(storage_root: StorageRoot, classifier_dir: str, train_dir: str,
                       batch_size: int, use_gpu: bool, score_names: list[str]) -> TrainFit:
    """Fit the scores that learn from ID training data (kNN / Mahalanobis statistics, fitted
    pytorch-ood detectors) on the training split's activations, embedded in chunks on this
    task's device; returned on the CPU for the object store.

    Runs once per classifier (a Ray task); the scoring actors share the result. The pooled
    activations (the largest) are kept only when a detector fits on them (ReAct).
    """
    clf = LoadedClassifier(storage_root, classifier_dir, use_gpu)
    storage = open_storage(storage_root)
    keep_pooled = any(n.startswith(POOD_PREFIX) and needs_fit(n)
                      and pood_spec(n).reads == "pooled+head" for n in score_names)
    parts: list[Activations] = []
    labels, chunk = [], []

    def embed() -> None:
        acts = clf.activations_on_device(np.stack(chunk))
        pooled = acts.pooled if keep_pooled else acts.pooled[:, :0]
        parts.append(Activations(acts.logits.float(), acts.embeddings.float(), pooled.float()))
        chunk.clear()

    for path in shard_paths(storage, train_dir, read_manifest(storage, train_dir)):
        for _, image, meta in iter_samples(storage, path):
            chunk.append(image.transpose(2, 0, 1))
            labels.append(meta["label"])
            if len(chunk) == batch_size:
                embed()
    if chunk:
        embed()
    train = Activations(*(torch.cat(field) for field in zip(*parts, strict=True)))
    fitted = fit_train(score_names, clf.model, train, torch.as_tensor(labels).to(clf.device))
    return fitted.to("cpu")


class Scorer:
    """Ray Data callable class: every classifier of the experiment loaded once per actor, so
    scoring a grid starts one actor pool, not one per classifier."""

    def __init__(self, storage_root: str, classifier_dirs: dict[str, str],
                 score_names: list[str], fitted: dict[str, Any] | None = None,
                 use_gpu: bool = False):
        import ray

        self.classifiers = {run: LoadedClassifier(storage_root, directory, use_gpu)
                            for run, directory in classifier_dirs.items()}
        # {run: ObjectRef} from the fit tasks (refs nested in a dict are not resolved for us),
        # moved to this actor's device once
        self.fitted = {run: ray.get(ref).to(self.classifiers[run].device)
                       for run, ref in (fitted or {}).items()}
        self.scores = {run: ScoreSet(score_names, clf.model, self.fitted.get(run))
                       for run, clf in self.classifiers.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"dataset": batch["dataset"], "sample": batch["key"], "label": batch["label"]}
        for run, clf in self.classifiers.items():
            acts = clf.activations_on_device(batch["image"])
            out[f"pred::{run}"] = acts.logits.argmax(1).cpu().numpy()
            out.update({f"score::{run}::{k}": v for k, v in self.scores[run](acts).items()})
        return out


def finished_classifiers(cfg: ExperimentConfig, layout: RunLayout) -> list[dict[str, Any]]:
    """Cards of every finished classifier of the experiment: this grid's and earlier grids'.

    Every cell of the configured grid must be finished; classifiers that earlier runs with
    other grids left in the same experiment are scored too, so grids accumulate in one report.
    """
    storage = layout.storage
    missing = [s.name for s in grid(cfg)
               if not storage.exists(f"{layout.classifier_dir(s.name)}/{CARD}")]
    if missing:
        raise MissingError(f"classifier(s) {', '.join(missing)} not trained under "
                                f"{storage.uri_of(layout.classifiers_dir)}; run `oodscale train`")
    infos = storage.fs.get_file_info(pafs.FileSelector(layout.classifiers_dir))
    cards = []
    for info in sorted(infos, key=lambda i: i.path):
        card_path = f"{info.path}/{CARD}"
        if info.type == pafs.FileType.Directory and storage.exists(card_path):
            cards.append(json.loads(storage.read_bytes(card_path)))
    id_classes = read_manifest(storage, layout.id_split("train")).class_names
    for card in cards:  # a classifier of other classes would score and count accuracy wrongly
        if card["class_names"] != id_classes:
            where = storage.uri_of(layout.classifier_dir(card["run"]))
            raise InputError(f"classifier {card['run']} was trained on {card['num_classes']} "
                             f"classes {card['class_names']}, the ID data has {len(id_classes)}"
                             f" {id_classes}; delete {where} (or set name to a new experiment) "
                             f"and rerun `oodscale train`")
    return cards


def test_sets(cfg: ExperimentConfig, layout: RunLayout) -> dict[str, str]:
    """Name → shard directory of the ID test split and every OOD set of this experiment."""
    sets = {"id": layout.id_split("test")}
    for name in [*cfg.data.ood_sets, *(s.name for s in cfg.data.extra_ood)]:
        sets[name] = layout.ood_set(name)
    return sets


def validation_sets(cfg: ExperimentConfig, layout: RunLayout) -> dict[str, str]:
    """`val:`-prefixed name → directory of the ID validation split and each OOD validation set,
    where prepare wrote them (an experiment prepared before they existed has none)."""
    sets = {f"{VAL_PREFIX}id": layout.id_split(VAL_SPLIT)}
    sets.update({f"{VAL_PREFIX}{name}": layout.ood_val_set(name)
                 for name in cfg.data.validation_ood_sets})
    present = {k: v for k, v in sets.items() if try_read_manifest(layout.storage, v) is not None}
    return present if f"{VAL_PREFIX}id" in present and len(present) > 1 else {}


def _test_dataset(layout: RunLayout, sets: dict[str, str]):
    parts = []
    for name, directory in sets.items():
        ds, _ = read_shards(layout.storage, directory, keys=True)
        parts.append(ds.map_batches(_tag, fn_kwargs={"name": name}, batch_format="numpy"))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _tag(batch: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    batch["dataset"] = np.full(len(batch["label"]), name)
    return batch


def score_runs(cfg: ExperimentConfig, layout: RunLayout) -> pd.DataFrame:
    """The long scores frame for every finished classifier of the experiment."""
    import ray
    import ray.data

    storage = layout.storage
    use_gpu = resolve_use_gpu(cfg.evaluate.use_gpu)
    if use_gpu:
        require_gpus(cfg.evaluate.concurrency, "evaluate.concurrency")
    sets = {**test_sets(cfg, layout), **validation_sets(cfg, layout)}
    data = _test_dataset(layout, sets).materialize()
    evaluate = cfg.evaluate
    fit_task = ray.remote(fit_train_features).options(num_cpus=evaluate.cpus_per_actor,
                                                       num_gpus=1 if use_gpu else 0)
    cards = finished_classifiers(cfg, layout)
    dirs = {card["run"]: layout.classifier_dir(card["run"]) for card in cards}
    fitted = None
    if any(needs_fit(n) for n in evaluate.scores):  # all fits at once, shared by the actors
        fitted = {run: fit_task.remote(storage.uri, directory, layout.id_split("train"),
                                       evaluate.batch_size, use_gpu, list(evaluate.scores))
                  for run, directory in dirs.items()}
        # Finish the fits before the scoring actors take the GPUs: an actor that waited on a
        # fit inside its constructor would hold the GPU the fit needs.
        ray.wait(list(fitted.values()), num_returns=len(fitted))
    scored = data.map_batches(
        Scorer, batch_size=evaluate.batch_size,
        compute=ray.data.ActorPoolStrategy(size=evaluate.concurrency),
        num_cpus=evaluate.cpus_per_actor, num_gpus=1 if use_gpu else 0, batch_format="numpy",
        fn_constructor_kwargs={"storage_root": storage.uri, "classifier_dirs": dirs,
                               "score_names": list(evaluate.scores), "fitted": fitted,
                               "use_gpu": use_gpu})
    wide = pd.concat(list(track(scored.iter_batches(batch_size=None, batch_format="pandas"),
                                f"evaluate: {len(cards)} classifiers, {len(sets)} test sets",
                                data.count(), "image", size=len)), ignore_index=True)
    frames = []
    for card in cards:
        run = card["run"]
        prefix = f"score::{run}::"
        renames = {c: c.removeprefix(prefix) for c in wide.columns if c.startswith(prefix)}
        long = wide[["dataset", "sample", "label", f"pred::{run}", *renames]].rename(
            columns={f"pred::{run}": "pred", **renames}).melt(
            id_vars=["dataset", "sample", "label", "pred"], var_name="score_name",
            value_name="score")
        long = long.assign(run=run, loss=card["loss"], outliers=card["outliers"],
                           seed=card["seed"],
                           is_ood=~long["dataset"].isin(["id", f"{VAL_PREFIX}id"]))
        frames.append(long)
    columns = ["run", "loss", "outliers", "seed", "score_name", "dataset", "sample", "is_ood",
               "score", "label", "pred"]
    scores = pd.concat(frames, ignore_index=True)[columns]
    return scores.astype({"seed": "int64", "label": "int64", "pred": "int64", "sample": "str",
                          "score": "float64", "is_ood": "bool"})


def ood_groups(cfg: ExperimentConfig) -> dict[str, str]:
    groups = {name: ("near" if name in cfg.data.near_ood else "far") for name in cfg.data.ood_sets}
    groups.update({s.name: s.group for s in cfg.data.extra_ood})
    return groups


def _write_parquet(layout: RunLayout, name: str, frame: pd.DataFrame) -> None:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    layout.storage.write_bytes_atomic(f"{layout.eval_dir}/{name}", buf.getvalue())


def evaluate(cfg: ExperimentConfig, layout: RunLayout) -> dict[str, Any]:
    """Score, aggregate and report; returns the summary table and where the files are."""
    scores = score_runs(cfg, layout)
    is_val = scores["dataset"].str.startswith(VAL_PREFIX)
    if is_val.any():  # the validation rows choose (report), the test rows report
        val_scores = scores[is_val].assign(
            dataset=scores.loc[is_val, "dataset"].str.removeprefix(VAL_PREFIX))
        _write_parquet(layout, "val_scores.parquet", val_scores.reset_index(drop=True))
        _write_parquet(layout, "val_results.parquet", aggregate(val_scores, ood_groups(cfg)))
    scores = scores[~is_val].reset_index(drop=True)
    _write_parquet(layout, "scores.parquet", scores)
    results = aggregate(scores, ood_groups(cfg))
    _write_parquet(layout, "results.parquet", results)
    summary = render_report(cfg, layout, results, scores)
    return {"summary": summary, "eval_dir": layout.storage.uri_of(layout.eval_dir),
            "runs": int(results["run"].nunique())}


def set_sources(cfg: ExperimentConfig, layout: RunLayout) -> dict[str, str]:
    """Test set → how many distinct source images it holds, from the manifests prepare wrote
    (sets prepared before manifests recorded it are left out)."""
    out = {}
    for name, directory in test_sets(cfg, layout).items():
        manifest = try_read_manifest(layout.storage, directory)
        if manifest is None:
            continue
        if name == "id":
            out[name] = f"{manifest.num_samples} images"
        elif "sources" in manifest.extra:
            out[name] = manifest.extra["sources"]
        elif manifest.extra.get("source") != "builtin":
            out[name] = f"{manifest.num_samples} images (bring-your-own)"
    return out


def generator_quality(cfg: ExperimentConfig, layout: RunLayout) -> dict[str, Any] | None:
    """The sample quality the generator's card records, and under `drawn` that of each set of
    outliers the grid trains on (their manifests), where they were measured."""
    storage = layout.storage
    card = f"{layout.diffusion_dir}/{MODEL_CARD}"
    quality = dict(json.loads(storage.read_bytes(card)).get("quality") or {}) \
        if storage.exists(card) else {}
    drawn = {}
    for source in generator_sources(cfg.train.outlier_sources, cfg.generate.guidance):
        manifest = try_read_manifest(storage, layout.synthetic_variant(source.dirname))
        if manifest is not None and "quality" in manifest.extra:
            drawn[source.dirname] = manifest.extra["quality"]
    if drawn:
        quality["drawn"] = drawn
    return quality or None


def render_report(cfg: ExperimentConfig, layout: RunLayout, results: pd.DataFrame,
                  scores: pd.DataFrame) -> str:
    """report.md, report.html and plots/ from the two frames (plus provenance), written under
    eval/ (local or remote)."""
    storage = layout.storage
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        extra = {}
        grid_png = f"{layout.synthetic_variant(synthetic_dirname(cfg.generate.guidance))}/grid.png"
        if storage.exists(grid_png):
            local_grid = out / "plots" / "outlier_grid.png"
            local_grid.parent.mkdir(parents=True, exist_ok=True)
            local_grid.write_bytes(storage.read_bytes(grid_png))
            extra["Label-mixup outliers beside ID samples"] = str(local_grid)
        prov = provenance(cfg, layout, sorted(results["run"].unique()))
        selection = None
        if storage.exists(f"{layout.eval_dir}/val_results.parquet"):
            selection = pd.read_parquet(io.BytesIO(storage.read_bytes(
                f"{layout.eval_dir}/val_results.parquet")))
        summary = write_report(results, scores, str(out), title=f"oodscale — {cfg.name}",
                               extra_images=extra, provenance=prov, selection=selection,
                               set_sources=set_sources(cfg, layout),
                               n_boot=cfg.evaluate.bootstrap,
                               quality=generator_quality(cfg, layout))
        for path in sorted(out.rglob("*")):
            if path.is_file():
                rel = path.relative_to(out).as_posix()
                storage.write_bytes_atomic(f"{layout.eval_dir}/{rel}", path.read_bytes())
    return summary
