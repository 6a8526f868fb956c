"""A small long-format scores frame (scores.parquet's columns) that the report tests render,
shared by tests/test_report.py and tests/test_report_html.py."""

from __future__ import annotations

import numpy as np
import pandas as pd

GROUPS = {"held_out": "near", "noise": "far"}  # "textures" is unlisted -> far


def toy_scores(seeds=(0, 1)) -> pd.DataFrame:
    """Small long frame: 2 losses x 2 outlier settings x seeds x 2 scores, 3 OOD sets."""
    rng = np.random.default_rng(0)
    frames = []
    for loss in ("softmax", "arcface"):
        for outliers in ("none", "labelmix"):
            for seed in seeds:
                run = f"{loss}-{outliers}-s{seed}"
                labels = np.arange(20) % 3
                preds = labels.copy()
                preds[:2] = (preds[:2] + 1) % 3  # 90 % accuracy
                # arcface+labelmix separates perfectly: it wins every paired comparison.
                shift = 10.0 if (loss, outliers) == ("arcface", "labelmix") else 1.0
                for score_name in ("msp", "maxcos"):
                    parts = [("id", rng.normal(shift, 1.0, 20), labels, preds)]
                    for ood_set in ("held_out", "noise", "textures"):
                        minus = -np.ones(15, dtype=int)
                        parts.append((ood_set, rng.normal(0.0, 1.0, 15), minus, minus))
                    for dataset, score, label, pred in parts:
                        frames.append(pd.DataFrame({
                            "run": run, "loss": loss, "outliers": outliers, "seed": seed,
                            "score_name": score_name, "dataset": dataset,
                            "sample": [f"{dataset}-{i:03d}" for i in range(len(score))],
                            "is_ood": dataset != "id", "score": score,
                            "label": label, "pred": pred,
                        }))
    return pd.concat(frames, ignore_index=True)
