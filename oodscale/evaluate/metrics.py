"""OOD detection metrics, following OpenOOD v1.5's conventions.

Scores use OpenOOD's sign: higher means "more in-distribution". OOD is the positive class, so
ROC and AUPR-Out rank by ``-score``; AUPR-In ranks ID (positive) by ``score``. All metrics are
returned in percent. ``fpr95_id_positive`` is the other convention found in the literature
(energy, ODIN papers): the share of OOD accepted when 95 % of ID is accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

TPR_TARGET = 0.95


def _check_scores(name: str, scores: np.ndarray) -> np.ndarray:
    """Return ``scores`` as a flat float array, refusing what would silently skew a metric."""
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one score to compute OOD metrics")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} NaN or infinite score(s)")
    return arr


def _fpr_at_tpr(positive: np.ndarray, ranking: np.ndarray, tpr: float) -> float:
    """FPR at the first ROC point whose TPR reaches ``tpr`` (positives rank high).

    ``drop_intermediate=False`` keeps every threshold, so collinear points that sklearn would
    otherwise drop cannot move the first point that reaches the target.
    """
    fpr_list, tpr_list, _ = skm.roc_curve(positive, ranking, drop_intermediate=False)
    return float(fpr_list[np.argmax(tpr_list >= tpr)])


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """FPR@95, AUROC, AUPR-In, AUPR-Out (OOD positive) and the ID-positive FPR@95, in %."""
    ids = _check_scores("id_scores", id_scores)
    oods = _check_scores("ood_scores", ood_scores)
    conf = np.concatenate([ids, oods])
    is_ood = np.concatenate([np.zeros(ids.size, dtype=int), np.ones(oods.size, dtype=int)])

    fpr_list, tpr_list, _ = skm.roc_curve(is_ood, -conf, drop_intermediate=False)
    prec_in, rec_in, _ = skm.precision_recall_curve(1 - is_ood, conf)
    prec_out, rec_out, _ = skm.precision_recall_curve(is_ood, -conf)
    return {
        "fpr95": 100.0 * float(fpr_list[np.argmax(tpr_list >= TPR_TARGET)]),
        "auroc": 100.0 * float(skm.auc(fpr_list, tpr_list)),
        "aupr_in": 100.0 * float(skm.auc(rec_in, prec_in)),
        "aupr_out": 100.0 * float(skm.auc(rec_out, prec_out)),
        "fpr95_id_positive": 100.0 * _fpr_at_tpr(1 - is_ood, conf, TPR_TARGET),
    }


def id_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Top-1 accuracy in %, so it sits in the same table as the OOD metrics."""
    y = np.asarray(labels).ravel()
    p = np.asarray(preds).ravel()
    if y.size == 0:
        raise ValueError("labels is empty: cannot compute accuracy")
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and preds ({p.size}) differ in length")
    return 100.0 * float(np.mean(y == p))


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and population std (ddof=0) over seeds; a single seed gives std 0.0."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(arr.mean()), float(arr.std(ddof=0))
