"""configs/fashion-gpu.yaml (`make benchmark-gpu`), shrunk to a smoke run on the CPU: every
stage of the full-fidelity recipe (28x28 Fashion-MNIST, ResNet-18, augmentation, EMA DDPM,
label-mixup OE from scratch and as fine-tuning) runs end to end and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from oodscale.cli import main
from oodscale.config import load_config

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fashion-gpu.yaml")
ON_CPU = ["diffusion.use_gpu=false", "diffusion.mixed_precision=no", "generate.use_gpu=false",
          "train.use_gpu=false", "train.mixed_precision=no", "evaluate.use_gpu=false"]
SMOKE = [
    "data.max_train_per_class=24", "data.max_test_per_class=10", "data.ood_samples=16",
    "data.val_ood_samples=16", "data.shard_size=64", "data.ood_sets=[openset,digits,gaussian]",
    "diffusion.block_out_channels=[8,16,16]", "diffusion.layers_per_block=1",
    "diffusion.epochs=1", "diffusion.batch_size=32", "diffusion.quality_per_class=1",
    "diffusion.cpus_per_worker=1", "generate.num_shards=2", "generate.samples_per_shard=8",
    "generate.steps=2", "generate.batch_size=16", "generate.grid_per_class=1",
    "generate.quality_samples=8", "generate.cpus_per_actor=1", "train.epochs=1",
    "train.finetune_epochs=1", "train.batch_size=16", "train.outlier_batch_size=8",
    "train.embedding_dim=16", "train.cpus_per_worker=1", "evaluate.scores=[msp,energy]",
    "evaluate.batch_size=256", "evaluate.cpus_per_actor=1", "evaluate.bootstrap=100",
]


def test_the_full_fidelity_config_keeps_its_fidelity():
    cfg = load_config(CONFIG)
    assert cfg.data.image_size == 28 and cfg.data.max_train_per_class is None
    assert cfg.train.backbone == "resnet18" and cfg.train.augment.flip
    assert cfg.diffusion.ema_decay > 0 and cfg.diffusion.use_gpu
    outliers = cfg.generate.num_shards * cfg.generate.samples_per_shard
    steps = 32_400 // cfg.train.batch_size  # 6 classes x 6,000 less the 10 % validation
    draws = cfg.train.epochs * steps * cfg.train.outlier_batch_size
    assert outliers >= 20_000 and draws <= 2 * outliers  # none shown more than twice


def test_the_full_fidelity_recipe_runs_end_to_end_on_the_cpu(tmp_path, ray_cluster):
    overrides = [f"storage.root={tmp_path}", *ON_CPU, *SMOKE]
    assert main(["run", CONFIG, *overrides]) == 0
    run = tmp_path / "fashion-gpu"
    card = json.loads((run / "diffusion" / "model.json").read_text())
    assert card["image_size"] == 28 and card["ema_decay"] == 0.999 and "quality" in card
    tuned = json.loads((run / "classifiers" / "arcface-labelmix-ft-s0" / "classifier.json")
                       .read_text())
    assert tuned["backbone"] == "resnet18" and tuned["finetunes"] == "arcface-none-s0"
    results = pd.read_parquet(run / "eval" / "results.parquet")
    assert set(results["outliers"]) == {"none", "labelmix", "labelmix-ft"}
    assert "## Drawn outliers" in (run / "eval" / "report.md").read_text()
