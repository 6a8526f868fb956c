"""Paired differences between cells with 95 % bootstrap intervals over seeds and test images.

A comparison of two cells (say `arcface-labelmix` against `arcface-none`) pairs them by seed
and by image: each bootstrap draw resamples the seeds both cells share and the ID and OOD test
images (by their `sample` key), the same draw for both cells, and takes the difference of the
group metric (near or far: the mean over the group's OOD sets, then over the drawn seeds).
Every classifier is scored on the same test images, so the image draws are made once per test
set and shared by every comparison. A single seed still gets the image part.

Metrics are computed from per-draw image weights (a multinomial draw is a weight vector), which
turns FPR95 and AUROC into cumulative sums over one sort of the scores: exact for every draw,
ties counted as the ROC curve counts them, and `ood_metrics` for weights of one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from oodscale.classify.loss_table import BASELINE_LOSS
from oodscale.errors import InputError
from oodscale.evaluate.metrics import TPR_TARGET, ood_metrics
from oodscale.outlier_sources import NO_OUTLIERS

METRICS = ("fpr95", "auroc")
LOWER_IS_BETTER = {"fpr95": True, "auroc": False, "id_acc": False}
CONFIDENCE = 0.95
ID_ACC_MARGIN = 1.0  # points of ID accuracy a cell may lose and still count as "kept"
COMPARISON_COLUMNS = [
    "protocol", "comparison", "loss", "outliers", "score_name", "ref_loss", "ref_outliers",
    "ref_score_name", "group", "metric", "seeds", "value", "ref_value", "diff", "ci_low",
    "ci_high", "verdict", "n_boot",
]
_CHUNK = 128  # draws computed at once: bounds memory at ~chunk x images floats


def weighted_ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, id_weights: np.ndarray,
                         ood_weights: np.ndarray) -> dict[str, np.ndarray]:
    """FPR95 and AUROC in % (OOD positive, higher score = more ID) for each row of weights.

    `id_weights` is draws x len(id_scores), `ood_weights` draws x len(ood_scores): how often
    each image appears in a draw.
    """
    distinct, where = np.unique(np.concatenate([id_scores, ood_scores]), return_inverse=True)
    id_where, ood_where = where[:len(id_scores)], where[len(id_scores):]
    out = {m: np.empty(len(id_weights)) for m in METRICS}
    for lo in range(0, len(id_weights), _CHUNK):
        id_at = _per_value(id_weights[lo:lo + _CHUNK], id_where, len(distinct))
        ood_at = _per_value(ood_weights[lo:lo + _CHUNK], ood_where, len(distinct))
        id_below, ood_below = np.cumsum(id_at, axis=1), np.cumsum(ood_at, axis=1)
        id_total, ood_total = id_below[:, -1:], ood_below[:, -1:]
        # flagging every score <= a threshold as OOD: the first threshold that catches 95 %
        first = np.argmax(ood_below / ood_total >= TPR_TARGET, axis=1)
        rows = np.arange(len(id_at))
        out["fpr95"][lo:lo + _CHUNK] = 100.0 * id_below[rows, first] / id_total[:, 0]
        id_above = id_total - id_below + 0.5 * id_at  # ID ranked above each OOD value, ties half
        out["auroc"][lo:lo + _CHUNK] = 100.0 * (ood_at * id_above).sum(1) / (
            id_total[:, 0] * ood_total[:, 0])
    return out


def _per_value(weights: np.ndarray, where: np.ndarray, n_values: int) -> np.ndarray:
    """draws x n_values: each draw's weight summed per distinct score (one bincount)."""
    flat = where[None, :] + n_values * np.arange(len(weights))[:, None]
    return np.bincount(flat.ravel(), weights=weights.ravel(),
                       minlength=n_values * len(weights)).reshape(len(weights), n_values)


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a cell (loss, outliers) read through one score."""

    loss: str
    outliers: str
    score_name: str


class PairedBootstrap:
    """Bootstrap draws of every metric a comparison needs, each computed once and shared.

    `scores` is the long `scores.parquet` frame (with its `sample` key), `groups` maps each
    OOD set to near or far.
    """

    def __init__(self, scores: pd.DataFrame, groups: dict[str, str], n_boot: int, seed: int,
                 sides: Iterable[Side]):
        self.n_boot, self.seed, self.groups = n_boot, seed, groups
        cell = ["loss", "outliers", "score_name"]
        wanted = pd.DataFrame(sorted({(s.loss, s.outliers, s.score_name) for s in sides}),
                              columns=cell)
        part = scores.merge(wanted, on=cell)
        self.runs = {key: dict(zip(p["seed"], p["run"], strict=True)) for key, p in
                     part[["loss", "outliers", "seed", "run"]].drop_duplicates().groupby(
                         ["loss", "outliers"])}
        self._values: dict[tuple[str, str, str], np.ndarray] = {}
        self._pred: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._keys: dict[str, np.ndarray] = {}
        for (run, score_name, dataset), rows in part.groupby(["run", "score_name", "dataset"]):
            rows = rows.sort_values("sample")
            keys = rows["sample"].to_numpy()
            known = self._keys.setdefault(dataset, keys)
            if len(known) != len(keys) or not np.array_equal(known, keys):
                raise InputError(f"run {run} scored other images of {dataset!r} than the other "
                                 "runs: pairs need the same test images; rerun `oodscale "
                                 "evaluate` so every classifier scores the same sets")
            self._values[run, score_name, dataset] = rows["score"].to_numpy(np.float64)
            if dataset == "id" and run not in self._pred:
                self._pred[run] = (rows["label"].to_numpy(), rows["pred"].to_numpy())
        self.ood_sets = sorted(d for d in self._keys if d != "id")
        if "id" not in self._keys:
            raise ValueError("the scores have no ID test rows (dataset == 'id') to compare on")
        rng = np.random.default_rng(seed)
        self._weights = {d: rng.multinomial(len(k), np.full(len(k), 1.0 / len(k)), size=n_boot)
                         .astype(np.float64) for d, k in sorted(self._keys.items())}
        self._draws: dict[tuple, tuple[float, np.ndarray]] = {}

    def _set_metric(self, run: str, score_name: str, ood_set: str, metric: str,
                    ) -> tuple[float, np.ndarray]:
        key = (run, score_name, ood_set)
        if key not in self._draws:
            ids, oods = self._values[run, score_name, "id"], self._values[key]
            point = ood_metrics(ids, oods)  # the value results.parquet holds
            draws = weighted_ood_metrics(ids, oods, self._weights["id"], self._weights[ood_set])
            self._draws[key] = {m: (point[m], draws[m]) for m in METRICS}
        return self._draws[key][metric]

    def _run_metric(self, run: str, score_name: str, group: str, metric: str,
                    ) -> tuple[float, np.ndarray]:
        """(point, draws) of one classifier's metric on a group (mean over its sets)."""
        if metric == "id_acc":
            labels, pred = self._pred[run]
            hits = (labels == pred).astype(np.float64)
            w = self._weights["id"]
            return 100.0 * hits.mean(), 100.0 * (w @ hits) / w.sum(1)
        sets = [s for s in self.ood_sets if self.groups.get(s, "far") == group]
        parts = [self._set_metric(run, score_name, s, metric) for s in sets]
        return (float(np.mean([p for p, _ in parts])),
                np.mean(np.stack([d for _, d in parts]), axis=0))

    def has_group(self, group: str) -> bool:
        return group == "id" or any(self.groups.get(s, "far") == group for s in self.ood_sets)

    def compare(self, cell: Side, ref: Side, group: str, metric: str) -> dict[str, object]:
        """The paired difference cell − ref (point, interval, verdict) on the seeds both have."""
        mine, theirs = self.runs[cell.loss, cell.outliers], self.runs[ref.loss, ref.outliers]
        seeds = sorted(set(mine) & set(theirs))
        if not seeds:
            raise ValueError(f"{cell.loss}-{cell.outliers} and {ref.loss}-{ref.outliers} share "
                             "no seed: nothing to pair")
        a = [self._run_metric(mine[s], cell.score_name, group, metric) for s in seeds]
        b = [self._run_metric(theirs[s], ref.score_name, group, metric) for s in seeds]
        diffs = np.stack([da - db for (_, da), (_, db) in zip(a, b, strict=True)])  # seeds x B
        seed_rng = np.random.default_rng([self.seed, len(seeds)])
        counts = seed_rng.multinomial(len(seeds), np.full(len(seeds), 1.0 / len(seeds)),
                                      size=self.n_boot)  # B x seeds: the seeds each draw takes
        boot = (counts * diffs.T).sum(1) / len(seeds)
        tail = 100.0 * (1.0 - CONFIDENCE) / 2.0
        low, high = np.percentile(boot, [tail, 100.0 - tail])
        value, ref_value = np.mean([p for p, _ in a]), np.mean([p for p, _ in b])
        return {"group": group, "metric": metric, "seeds": len(seeds), "value": value,
                "ref_value": ref_value, "diff": value - ref_value, "ci_low": float(low),
                "ci_high": float(high), "verdict": verdict(metric, float(low), float(high)),
                "n_boot": self.n_boot}


def verdict(metric: str, low: float, high: float) -> str:
    """better / worse where the interval excludes zero, else undecided."""
    if low > 0 or high < 0:
        return "better" if (high < 0) == LOWER_IS_BETTER[metric] else "worse"
    return "undecided"


def comparisons(scores: pd.DataFrame, groups: dict[str, str], protocols: dict[str, dict[str, str]],
                n_boot: int, seed: int) -> pd.DataFrame:
    """Every comparison the report makes, under each protocol (name → loss → its score): each
    cell against its loss without outliers (`vs_none`) and against softmax without outliers
    (`vs_softmax`), for FPR95 and AUROC on the near and far groups and for ID accuracy."""
    cells = sorted(set(zip(scores["loss"], scores["outliers"], strict=True)))
    plans = []
    for protocol, chosen in protocols.items():
        for loss, outliers in cells:
            if loss not in chosen:
                continue
            side = Side(loss, outliers, chosen[loss])
            refs = {"vs_none": (loss, NO_OUTLIERS), "vs_softmax": (BASELINE_LOSS, NO_OUTLIERS)}
            taken = {(loss, outliers)}  # the baseline loss's vs_softmax is its vs_none: once
            for name, (ref_loss, ref_outliers) in refs.items():
                if ((ref_loss, ref_outliers) in taken or ref_loss not in chosen
                        or (ref_loss, ref_outliers) not in cells):
                    continue
                taken.add((ref_loss, ref_outliers))
                plans.append((protocol, name, side, Side(ref_loss, ref_outliers,
                                                         chosen[ref_loss])))
    if not plans:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    boot = PairedBootstrap(scores, groups, n_boot, seed,
                           [s for _, _, cell, ref in plans for s in (cell, ref)])
    rows = []
    for protocol, name, cell, ref in plans:
        for group, metric in [(g, m) for g in ("near", "far") for m in METRICS] + [
                ("id", "id_acc")]:
            if boot.has_group(group):
                rows.append({"protocol": protocol, "comparison": name, "loss": cell.loss,
                             "outliers": cell.outliers, "score_name": cell.score_name,
                             "ref_loss": ref.loss, "ref_outliers": ref.outliers,
                             "ref_score_name": ref.score_name,
                             **boot.compare(cell, ref, group, metric)})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
