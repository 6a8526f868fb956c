"""MLflow tracking against a real local file store, read back with the MLflow client."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from oodscale import tracking
from oodscale.config import build_config
from oodscale.evaluate.report import aggregate
from oodscale.runtime import layout_for

mlflow = pytest.importorskip("mlflow", reason="the [mlflow] extra (in [test]) is not installed")


def _config(root, uri: str | None):
    return build_config({"name": "tiny"}, [f"storage.root={root}"]
                        + ([f"tracking.mlflow_uri={uri}"] if uri else []))


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str) -> dict[str, list]:
    client = _client(uri)
    experiment = client.get_experiment_by_name("tiny")
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id]):
        runs.setdefault(run.info.run_name, []).append(run)
    return runs


def test_untracked_config_logs_nothing(tmp_path):
    cfg = _config(tmp_path, None)
    assert cfg.tracking.mlflow_uri is None  # absent by default
    with tracking.stage_run(cfg, "train"):
        tracking.log_metrics({"loss": 1.0}, step=0)
        tracking.epoch_logger()({"label": "cell", "epoch": 0, "loss": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_stages_epochs_and_results_reach_mlflow(tmp_path):
    uri = f"file:{tmp_path / 'mlruns'}"
    cfg = _config(tmp_path / "runs", uri)
    layout = layout_for(cfg)
    rng = np.random.default_rng(0)
    scores = pd.DataFrame({
        "run": "softmax-none-s0", "loss": "softmax", "outliers": "none", "seed": 0,
        "score_name": "msp", "dataset": ["id"] * 20 + ["openset"] * 10 + ["gaussian"] * 10,
        "sample": [f"s{i:02d}" for i in range(40)],
        "is_ood": [False] * 20 + [True] * 20, "score": rng.normal(size=40),
        "label": [0, 1] * 10 + [-1] * 20, "pred": [0, 1] * 10 + [0] * 20})
    results = aggregate(scores, {"openset": "near", "gaussian": "far"})
    buf = io.BytesIO()
    results.to_parquet(buf, index=False)
    layout.storage.write_bytes_atomic(f"{layout.eval_dir}/results.parquet", buf.getvalue())

    with tracking.stage_run(cfg, "run"):
        with tracking.stage_run(cfg, "train-diffusion"):
            log = tracking.epoch_logger()
            for epoch, loss in enumerate([0.9, 0.5, 0.3]):
                log({"label": "", "epoch": epoch, "loss": loss, "images_per_s": 100.0})
        with tracking.stage_run(cfg, "train"):
            log = tracking.epoch_logger({"softmax-none-s0": {"loss": "softmax", "seed": 0}})
            for epoch, acc in enumerate([50.0, 80.0]):
                log({"label": "softmax-none-s0", "epoch": epoch, "loss": 1.0 / (epoch + 1),
                     "train_acc": acc})
        with tracking.stage_run(cfg, "evaluate"):
            tracking.log_results(layout)

    runs = _runs(uri)
    client = _client(uri)
    parent = runs["run"][0]
    ddpm = runs["train-diffusion"][0]
    assert ddpm.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert ddpm.data.params["train.epochs"] == str(cfg.train.epochs)  # the whole config
    assert ddpm.data.params["tracking.mlflow_uri"] == uri
    history = client.get_metric_history(ddpm.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.5), (2, 0.3)]
    assert all(r.info.status == "FINISHED" for group in runs.values() for r in group)

    cells = {r.data.tags["mlflow.parentRunId"]: r for r in runs["softmax-none-s0"]}
    cell = cells[runs["train"][0].info.run_id]
    assert cell.data.params == {"loss": "softmax", "seed": "0"}
    acc = client.get_metric_history(cell.info.run_id, "train_acc")
    assert [m.value for m in acc] == [50.0, 80.0]

    scored = cells[runs["evaluate"][0].info.run_id]
    row = results.set_index("ood_set").loc["openset"]
    assert scored.data.metrics["msp.openset.auroc"] == pytest.approx(row["auroc"])
    assert scored.data.metrics["msp.near_mean.fpr95"] == pytest.approx(row["fpr95"])
    assert scored.data.metrics["id_acc"] == pytest.approx(row["id_acc"])
    artifacts = [a.path for a in client.list_artifacts(runs["evaluate"][0].info.run_id)]
    assert "results.parquet" in artifacts


def test_failed_stage_is_marked_failed(tmp_path):
    uri = f"file:{tmp_path / 'mlruns'}"
    cfg = _config(tmp_path / "runs", uri)
    with pytest.raises(ValueError), tracking.stage_run(cfg, "generate"):
        raise ValueError("boom")
    assert _runs(uri)["generate"][0].info.status == "FAILED"


def test_metric_keys_are_mlflow_safe():
    assert tracking._metric_key("pood:ViM", "my set/1", "auroc") == "pood_ViM.my_set_1.auroc"
    assert tracking.flatten({"a": {"b": [1, 2]}, "c": None}) == {"a.b": "[1, 2]", "c": "None"}
