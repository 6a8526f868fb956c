"""The small trained digits experiment that the detector and pytorch-ood tests share (one
classifier, calibrated and evaluated), so the suite trains it once: the session fixture
`digits_experiment` in conftest.py."""

from __future__ import annotations

from pathlib import Path

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")
RUN = "softmax-none-s0"
SMALL = [
    "data.ood_sets=[openset,gaussian]", "data.ood_samples=60", "data.shard_size=200",
    "train.losses=[softmax]", "train.outliers=[none]", "train.seeds=[0]", "train.epochs=4",
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
