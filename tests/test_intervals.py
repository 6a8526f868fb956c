"""Paired bootstrap intervals and the claims decided from them, on frames with known effects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from oodscale.evaluate.claims import decide_claims, overall
from oodscale.evaluate.intervals import (
    PairedBootstrap,
    Side,
    comparisons,
    verdict,
    weighted_ood_metrics,
)
from oodscale.evaluate.metrics import ood_metrics

GROUPS = {"held": "near", "noise": "far"}


def _frame(shifts: dict[tuple[str, str], float], seeds=(0, 1, 2), n_id=300, n_ood=200,
           acc: dict[tuple[str, str], float] | None = None) -> pd.DataFrame:
    """Scores of cells whose ID scores sit `shift` above the OOD ones; the same images (keys)
    for every run, with per-image difficulty shared by all runs (what pairing cancels)."""
    rng = np.random.default_rng(0)
    hard = {d: rng.normal(0, 1, n) for d, n in (("id", n_id), ("held", n_ood), ("noise", n_ood))}
    labels = np.arange(n_id) % 3
    frames = []
    for (loss, outliers), shift in shifts.items():
        for seed in seeds:
            run = f"{loss}-{outliers}-s{seed}"
            wrong = int(round((1 - (acc or {}).get((loss, outliers), 0.9)) * n_id))
            pred = labels.copy()
            pred[:wrong] = (pred[:wrong] + 1) % 3
            for score_name in ("msp", "maxcos"):
                for dataset, base in hard.items():
                    noise = rng.normal(0, 0.3, len(base))
                    score = base + noise + (shift if dataset == "id" else 0.0)
                    is_id = dataset == "id"
                    frames.append(pd.DataFrame({
                        "run": run, "loss": loss, "outliers": outliers, "seed": seed,
                        "score_name": score_name, "dataset": dataset,
                        "sample": [f"{dataset}-{i:04d}" for i in range(len(base))],
                        "is_ood": not is_id, "score": score,
                        "label": labels if is_id else -1, "pred": pred if is_id else -1}))
    return pd.concat(frames, ignore_index=True)


def test_weighted_metrics_equal_the_plain_ones_on_repeated_images():
    rng = np.random.default_rng(1)
    ids, oods = np.round(rng.normal(1, 1, 120), 1), np.round(rng.normal(0, 1, 80), 1)  # ties
    pick_id, pick_ood = rng.integers(0, 120, 120), rng.integers(0, 80, 80)
    weights = (np.bincount(pick_id, minlength=120)[None].astype(float),
               np.bincount(pick_ood, minlength=80)[None].astype(float))
    got = weighted_ood_metrics(ids, oods, *weights)
    want = ood_metrics(ids[pick_id], oods[pick_ood])
    assert got["fpr95"][0] == pytest.approx(want["fpr95"])
    assert got["auroc"][0] == pytest.approx(want["auroc"])


def test_a_cell_against_itself_is_zero_and_undecided():
    scores = _frame({("softmax", "none"): 1.0})
    boot = PairedBootstrap(scores, GROUPS, 200, 0, [Side("softmax", "none", "msp")])
    row = boot.compare(Side("softmax", "none", "msp"), Side("softmax", "none", "msp"),
                       "near", "fpr95")
    assert row["diff"] == 0 and row["ci_low"] == row["ci_high"] == 0
    assert row["verdict"] == "undecided"


def test_a_real_effect_is_decided_and_a_null_one_is_not():
    scores = _frame({("arcface", "none"): 1.0, ("arcface", "labelmix"): 2.0,
                     ("softmax", "none"): 1.05})
    protocols = {"paper": {"arcface": "maxcos", "softmax": "msp"}}
    comp = comparisons(scores, GROUPS, protocols, 300, 0)
    oe = comp[(comp["comparison"] == "vs_none") & (comp["loss"] == "arcface")]
    fpr = oe[oe["metric"] == "fpr95"].set_index("group")
    assert (fpr["verdict"] == "better").all() and (fpr["ci_high"] < 0).all()
    auroc = oe[oe["metric"] == "auroc"].set_index("group")
    assert (auroc["verdict"] == "better").all() and (auroc["ci_low"] > 0).all()
    null = comp[(comp["comparison"] == "vs_softmax") & (comp["outliers"] == "none")
                & (comp["metric"] == "fpr95")]
    assert (null["verdict"] == "undecided").all()
    assert (null["ci_low"] < 0).all() and (null["ci_high"] > 0).all()
    # each cell once against each reference, softmax's cells not twice against softmax-none
    assert not comp.duplicated(["protocol", "loss", "outliers", "ref_loss", "ref_outliers",
                                "group", "metric"]).any()
    assert set(comp["comparison"]) == {"vs_none", "vs_softmax"}


def test_a_single_seed_still_gets_an_image_interval():
    scores = _frame({("arcface", "none"): 1.0, ("arcface", "labelmix"): 1.1}, seeds=(0,))
    comp = comparisons(scores, GROUPS, {"paper": {"arcface": "maxcos"}}, 300, 0)
    row = comp[(comp["metric"] == "auroc") & (comp["group"] == "near")].iloc[0]
    assert row["seeds"] == 1 and row["ci_low"] < row["diff"] < row["ci_high"]


def test_pairs_need_the_same_images():
    scores = _frame({("arcface", "none"): 1.0, ("arcface", "labelmix"): 2.0}, seeds=(0,))
    moved = scores["run"].str.startswith("arcface-labelmix") & (scores["dataset"] == "held")
    scores.loc[moved, "sample"] = scores.loc[moved, "sample"] + "x"
    with pytest.raises(ValueError, match="same test images"):
        comparisons(scores, GROUPS, {"paper": {"arcface": "maxcos"}}, 100, 0)


def test_claims_follow_the_intervals():
    scores = _frame({("softmax", "none"): 1.0, ("softmax", "labelmix"): 2.0,
                     ("arcface", "none"): 1.0, ("arcface", "labelmix"): 1.0},
                    acc={("arcface", "labelmix"): 0.80})
    comp = comparisons(scores, GROUPS, {"paper": {"arcface": "maxcos", "softmax": "msp"}},
                       300, 0)
    claims = decide_claims(comp)
    oe = claims[claims["claim"].str.startswith("label-mixup OE improves")]
    softmax = oe[(oe["loss"] == "softmax") & (oe["metric"] == "fpr95")]
    assert (softmax["verdict"] == "holds").all()
    assert overall(oe[oe["metric"] == "fpr95"]["verdict"]) == "undecided"  # arcface: no effect
    acc = claims[claims["claim"].str.contains("ID accuracy")].set_index("loss")
    assert acc.loc["softmax", "verdict"] == "holds"  # same predictions: a zero change
    assert acc.loc["arcface", "verdict"] == "fails"  # ten points lost, tightly


def test_verdict_directions():
    assert verdict("fpr95", -3.0, -1.0) == "better" and verdict("fpr95", 1.0, 3.0) == "worse"
    assert verdict("auroc", 1.0, 3.0) == "better" and verdict("auroc", -1.0, 2.0) == "undecided"
