import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from oodscale.evaluate.metrics import id_accuracy, mean_std, ood_metrics


def test_perfect_separation():
    m = ood_metrics(np.array([5.0, 6.0, 7.0]), np.array([0.0, 1.0, 2.0]))
    assert m["fpr95"] == 0.0
    assert m["auroc"] == 100.0
    assert m["aupr_in"] == pytest.approx(100.0)
    assert m["aupr_out"] == pytest.approx(100.0)
    assert m["fpr95_id_positive"] == 0.0


def test_reversed_scores():
    m = ood_metrics(np.array([0.0, 1.0, 2.0]), np.array([5.0, 6.0, 7.0]))
    assert m["auroc"] == 0.0
    assert m["fpr95"] == 100.0
    assert m["fpr95_id_positive"] == 100.0


def test_hand_example():
    # 10 ID scores 1..10; 20 OOD: eighteen at 0.5, one at 3.5, one at 8.5.
    ids = np.arange(1.0, 11.0)
    oods = np.array([0.5] * 18 + [3.5, 8.5])
    m = ood_metrics(ids, oods)
    # Detecting 19/20 OOD needs flagging everything <= 3.5: ID 1, 2, 3 -> 30 %.
    assert m["fpr95"] == pytest.approx(30.0)
    # Pairs (ID, OOD) with OOD ranked lower: 18*10 + 7 + 2 = 189 of 200.
    assert m["auroc"] == pytest.approx(94.5)
    # Accepting >= 95 % of 10 ID accepts all of them (>= 1): OOD 3.5 and 8.5 pass -> 10 %.
    assert m["fpr95_id_positive"] == pytest.approx(10.0)


def test_matches_sklearn_on_random_scores():
    rng = np.random.default_rng(0)
    ids = np.round(rng.normal(1.0, 1.0, 800), 1)  # rounding creates ties
    oods = np.round(rng.normal(0.0, 1.0, 600), 1)
    m = ood_metrics(ids, oods)
    conf = np.concatenate([ids, oods])
    is_ood = np.r_[np.zeros(ids.size), np.ones(oods.size)]
    assert m["auroc"] == pytest.approx(100 * roc_auc_score(is_ood, -conf), abs=1e-9)
    assert m["aupr_in"] == pytest.approx(100 * average_precision_score(1 - is_ood, conf), abs=1.5)
    assert m["aupr_out"] == pytest.approx(100 * average_precision_score(is_ood, -conf), abs=1.5)
    # FPR95 from its definition: share of ID at or below the highest threshold catching 95 % OOD.
    thresholds = np.sort(np.unique(conf))
    caught = np.array([np.mean(oods <= t) for t in thresholds])
    t95 = thresholds[np.argmax(caught >= 0.95)]
    assert m["fpr95"] == pytest.approx(100 * np.mean(ids <= t95))


@pytest.mark.parametrize(
    ("ids", "oods", "msg"),
    [
        (np.array([]), np.array([1.0]), "id_scores is empty"),
        (np.array([1.0]), np.array([]), "ood_scores is empty"),
        (np.array([1.0, np.nan]), np.array([1.0]), "NaN"),
        (np.array([1.0]), np.array([np.nan]), "NaN"),
    ],
)
def test_bad_inputs_raise(ids, oods, msg):
    with pytest.raises(ValueError, match=msg):
        ood_metrics(ids, oods)


def test_id_accuracy():
    assert id_accuracy(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 3])) == 75.0
    with pytest.raises(ValueError):
        id_accuracy(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError):
        id_accuracy(np.array([]), np.array([]))


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
