"""The small trained digits experiment that the detector and pytorch-ood tests share (one
classifier, calibrated and evaluated), so the suite trains it once: the session fixture
`digits_experiment` in conftest.py."""

from __future__ import annotations

from pathlib import Path

from tests.support import CONFIG, ONE_CELL

RUN = "softmax-none-s0"
SMALL = [
    "data.ood_sets=[openset,gaussian]", "data.ood_samples=60", "data.shard_size=200",
    *ONE_CELL, "train.epochs=4",
    "train.batch_size=32", "train.embedding_dim=16", "train.num_workers=1",
    "data.val_fraction=0.2",  # 152 validation images: a steadier 5 % quantile than 76
    "evaluate.scores=[energy,knn,msp]",
]


def build_experiment(root: Path) -> tuple[Path, list[str]]:
    """prepare, train, calibrate and evaluate under `root`; returns it with its overrides."""
    from oodscale.cli import main

    overrides = [f"storage.root={root}", *SMALL]
    for stage in ("prepare", "train", "calibrate", "evaluate"):
        assert main([stage, CONFIG, *overrides]) == 0, stage
    return root, overrides


def hand_calibrated(root: Path, run: str = "x-none-s0", experiment: str = "digits") -> Path:
    """A calibrated three-class 16x16 gray classifier written by hand under the local run root
    `root` (untrained weights, threshold far below every score; no Ray): enough for `predict`
    and `Detector.load` to load, score and decide. Returns its directory."""
    import json

    from oodscale.classify.checkpoints import classifier_from_card, save_classifier
    from oodscale.evaluate.calibration_card import CALIBRATION, weights_sha256
    from oodscale.runtime import open_storage

    card = {"backbone": "smallcnn", "loss": "softmax", "channels": 1, "image_size": 16,
            "num_classes": 3, "embedding_dim": 8, "head_options": {}, "run": run,
            "class_names": ["a", "b", "c"]}
    directory = root / experiment / "classifiers" / run
    save_classifier(classifier_from_card(card), card, directory)
    (directory / CALIBRATION).write_text(json.dumps({
        "default_score": "energy", "tpr_target": 0.95,
        "set_on": {"split": "val", "images": 10},
        "weights_sha256": weights_sha256(open_storage(str(directory)), str(directory)),
        "scores": {"energy": {"threshold": -1e9, "val_accepted": 1.0}}}))
    return directory
