"""What a person sees: the CLI's own Ray (a subprocess, as a user runs it) keeps Ray's logging
off the terminal by default, and `--verbose` brings it back. The quiet run also tracks to a
local MLflow store, so per-epoch metrics from real Ray Train workers are checked end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.integration
SMALL = [
    "data.ood_sets=[gaussian]", "data.ood_samples=16", "train.losses=[softmax]",
    "train.outliers=[none]", "train.epochs=2", "train.num_workers=1", "train.batch_size=32",
    "train.embedding_dim=16", "evaluate.scores=[msp]", "ray.num_cpus=4", "ray.object_store_mb=100",
]
RAY_NOISE = re.compile(r"\bINFO\b|\((RayTrainWorker|TrainController|SplitCoordinator|"
                       r"PlacementGroupCleaner)|Starting execution of Dataset|"
                       r"Reporting training result")
MAX_LINES = 40


def _oodscale(*args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",
                                                             "RAY_DATA_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([str(Path(sys.executable).parent / "oodscale"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=540)
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, "\n".join(lines[-60:])
    return lines


def _section(lines: list[str], stage: str) -> list[str]:
    start = lines.index(f"[oodscale] {stage} ...")
    end = next(i for i, line in enumerate(lines) if line.startswith(f"[oodscale] {stage} done"))
    return lines[start:end + 1]


def test_default_output_is_short_and_verbose_shows_ray(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    args = ["configs/digits.yaml", f"storage.root={tmp_path / 'runs'}", *SMALL]
    quiet = _oodscale("run", *args, f"tracking.mlflow_uri={uri}")
    noise = [line for line in quiet if RAY_NOISE.search(line)]
    assert noise == [], noise
    assert len(quiet) < MAX_LINES, "\n".join(quiet)
    assert sum("Ray's own logs" in line for line in quiet) == 1
    # each epoch line of the Ray Train worker is written once (Ray Train's print patch off)
    logs = Path(next(line for line in quiet if "Ray's own logs" in line).split(": ")[-1]
                .split(" (--verbose")[0])
    epoch_lines = [line for path in logs.glob("worker-*.*") if path.suffix in (".out", ".err")
                   for line in path.read_text(errors="replace").splitlines()
                   if "[oodscale] softmax-none-s0: loss" in line]
    assert len(epoch_lines) == 2, epoch_lines
    assert sum(line.startswith("| loss | outliers |") for line in quiet) == 1  # the table once

    verbose = _oodscale("evaluate", "--verbose", *args)
    assert any("Starting execution of Dataset" in line for line in verbose)
    assert len(verbose) > len(_section(quiet, "evaluate"))

    # the worker's epochs reached MLflow through the driver (oodscale.progress → tracking)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    stages = {r.data.tags.get("oodscale.stage"): r.info.run_id for r in runs}
    assert {"run", "prepare", "train", "evaluate"} <= set(stages)
    cell = next(r for r in runs if r.info.run_name == "softmax-none-s0"
                and r.data.tags["mlflow.parentRunId"] == stages["train"])
    history = client.get_metric_history(cell.info.run_id, "train_acc")
    assert [m.step for m in history] == [0, 1]
