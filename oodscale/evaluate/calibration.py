"""Decision thresholds for the detector, set on the ID validation split and kept beside the
classifier's weights.

A score says how ID an image looks; a user needs a yes/no. The threshold of each score is the
one that accepts `detector.tpr` (default 95 %) of the ID validation images: images the
classifier never trained on and no test set contains. `calibration.json` records the threshold,
what it was set on (split, image count, target and achieved acceptance) and the sha256 of the
weights it belongs to, so a retrained classifier can never be read with an old threshold.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from oodscale.classify.checkpoints import LoadedClassifier
from oodscale.config import ExperimentConfig
from oodscale.data.shards import iter_samples, read_manifest, shard_paths
from oodscale.data.validation import VAL_SPLIT
from oodscale.errors import InputError
from oodscale.evaluate.calibration_card import (
    CALIBRATION,
    calibration_names,
    is_current,
    weights_sha256,
)
from oodscale.evaluate.detectors import ScoreSet
from oodscale.evaluate.score_table import check_score_name, needs_fit
from oodscale.runtime import RunLayout, Storage, StorageRoot, open_storage

TRAIN_SPLIT, CALIBRATION_SPLIT = "data/id/train", f"data/id/{VAL_SPLIT}"  # experiment-relative


def image_batches(storage: Storage, directory: str, batch_size: int,
                  ) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """(N×C×H×W uint8 images, metas) of a shard set in batches, read in this process."""
    images, metas = [], []
    for path in shard_paths(storage, directory, read_manifest(storage, directory)):
        for _, image, meta in iter_samples(storage, path):
            images.append(image.transpose(2, 0, 1))
            metas.append(meta)
            if len(images) == batch_size:
                yield np.stack(images), metas
                images, metas = [], []
    if images:
        yield np.stack(images), metas


class ScoreReader:
    """One classifier and the named scores of it, fitted where they learn from the ID training
    split (evaluate's own fit and `ScoreSet`), on one device."""

    def __init__(self, storage_root: StorageRoot, classifier_dir: str, names: list[str],
                 use_gpu: bool, batch_size: int = 512) -> None:
        from oodscale.evaluate.score import fit_train_features

        for name in names:
            check_score_name(name)
        self.classifier = LoadedClassifier(storage_root, classifier_dir, use_gpu)
        fitted = None
        if any(needs_fit(n) for n in names):
            train_dir = f"{classifier_dir.rsplit('/', 2)[0]}/{TRAIN_SPLIT}"
            fitted = fit_train_features(storage_root, classifier_dir, train_dir, batch_size,
                                        use_gpu, list(names)).to(self.classifier.device)
        self.scores = ScoreSet(names, self.classifier.model, fitted)

    def __call__(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """({score name: N scores, higher = more ID}, N predicted class indices)."""
        acts = self.classifier.activations_on_device(images)
        return self.scores(acts), acts.logits.argmax(1).cpu().numpy()


def threshold_at_tpr(id_scores: np.ndarray, tpr: float) -> float:
    """The largest validation score t such that at least `tpr` of the scores are >= t."""
    ordered = np.sort(np.asarray(id_scores, dtype=np.float64))
    return float(ordered[int(np.floor(len(ordered) * (1.0 - tpr) + 1e-9))])


def calibrate_classifier(storage_root: str, classifier_dir: str, names: list[str], tpr: float,
                         default_score: str, batch_size: int, use_gpu: bool) -> dict[str, Any]:
    """Score the ID validation split, set each score's threshold, write calibration.json.

    A Ray task in the calibrate stage (on a GPU when the stage has them); plain Python too.
    """
    storage = open_storage(storage_root)
    val_dir = f"{classifier_dir.rsplit('/', 2)[0]}/{CALIBRATION_SPLIT}"
    reader = ScoreReader(storage_root, classifier_dir, names, use_gpu, batch_size)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for images, _ in image_batches(storage, val_dir, batch_size):
        for name, values in reader(images)[0].items():
            parts[name].append(values)
    if not parts[names[0]]:
        raise InputError(f"the ID validation split {storage.uri_of(val_dir)} is empty; raise "
                         f"data.val_fraction and prepare again")
    val = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    count = len(val[names[0]])
    thresholds = {name: threshold_at_tpr(values, tpr) for name, values in val.items()}
    calibration = {
        "rule": "OOD when score < threshold (scores are higher = more ID)",
        "default_score": default_score, "tpr_target": tpr,
        "set_on": {"split": CALIBRATION_SPLIT, "images": count},
        "train_split": TRAIN_SPLIT, "weights_sha256": weights_sha256(storage, classifier_dir),
        "scores": {name: {"threshold": thresholds[name],
                          "val_accepted": float(np.mean(val[name] >= thresholds[name]))}
                   for name in names}}
    storage.write_bytes_atomic(f"{classifier_dir}/{CALIBRATION}",
                               json.dumps(calibration, indent=2, sort_keys=True).encode())
    return calibration


def calibrate(cfg: ExperimentConfig, layout: RunLayout) -> list[dict[str, Any]]:
    """Calibrate every finished classifier whose calibration is missing or stale, one Ray task
    each; returns {run, threshold of the default score, images} per classifier calibrated."""
    import ray

    from oodscale.evaluate.score import finished_classifiers
    from oodscale.runtime import require_gpus, resolve_use_gpu

    storage = layout.storage
    if cfg.data.val_fraction == 0:
        raise InputError("data.val_fraction is 0, so there is no ID validation split to set "
                         "thresholds on; set it (e.g. 0.1) and prepare and train again")
    read_manifest(storage, layout.id_split(VAL_SPLIT))  # a clear error if prepare has not run
    runs = [card["run"] for card in finished_classifiers(cfg, layout)
            if not is_current(storage, layout.classifier_dir(card["run"]), cfg)]
    if not runs:
        return []
    ev = cfg.evaluate
    use_gpu = resolve_use_gpu(ev.use_gpu)
    if use_gpu:
        require_gpus(1, "evaluate.use_gpu")
    task = ray.remote(calibrate_classifier).options(num_cpus=ev.cpus_per_actor,
                                                    num_gpus=1 if use_gpu else 0)
    refs = {run: task.remote(storage.uri, layout.classifier_dir(run), calibration_names(cfg),
                             cfg.detector.tpr, cfg.detector.score, ev.batch_size, use_gpu)
            for run in runs}
    done = []
    for run, ref in refs.items():
        calibration = ray.get(ref)
        done.append({"run": run, "images": calibration["set_on"]["images"],
                     "threshold": calibration["scores"][cfg.detector.score]["threshold"]})
    return done
