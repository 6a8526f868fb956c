"""Optional experiment tracking in MLflow, on when `tracking.mlflow_uri` is set.

Each stage the CLI runs is an MLflow run (params: the whole config, dotted), nested under the
`run` command's run when the pipeline runs as a whole. Per-epoch metrics arrive on the driver
through oodscale.progress: the DDPM's on the stage run, each classifier cell's on a child run
named after the cell. Evaluate logs one child run per classifier with its results.parquet rows
as metrics, and the result files as artifacts.

Everything goes through `MlflowClient` with explicit run ids: the fluent API keeps its active
run per thread, and epoch metrics are logged from the progress thread. Without the setting
every function here is a no-op and mlflow is never imported.
"""

from __future__ import annotations

import io
import numbers
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodscale.config import ExperimentConfig
from oodscale.errors import SetupError
from oodscale.runtime import RunLayout

RESULT_METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")
RESULT_FILES = ("results.parquet", "report.md", "report.html")


@dataclass
class _Tracker:
    client: Any
    experiment_id: str
    stack: list[str] = field(default_factory=list)  # the open stage runs, innermost last
    children: dict[tuple[str, str], str] = field(default_factory=dict)


_active: _Tracker | None = None  # while a tracked stage runs in this process


def _connect(cfg: ExperimentConfig) -> _Tracker:
    uri = cfg.tracking.mlflow_uri
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise SetupError("tracking.mlflow_uri is set but mlflow is not installed: "
                           "pip install 'oodscale[mlflow]' (or unset tracking.mlflow_uri)"
                           ) from None
    if "://" not in uri or uri.startswith("file:"):
        # MLflow 3 keeps the file store only behind this switch (maintenance mode); a local
        # store is what works offline with the light mlflow-skinny client.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    name = cfg.tracking.experiment or cfg.name
    experiment = client.get_experiment_by_name(name)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(name))
    return _Tracker(client, experiment_id)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"train": {"epochs": 3}}` → `{"train.epochs": "3"}`, values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]
    return out


def _metric_key(*parts: str) -> str:
    """`energy.openset.auroc`: dot-joined, anything but letters, digits, `_` and `-` (a `:` in
    `pood:ViM`, a `/` that a file store would turn into a folder) as `_`."""
    return ".".join(re.sub(r"[^\w\-]", "_", p) for p in parts)


def _start(tracker: _Tracker, name: str, parent: str | None, params: dict[str, str],
           tags: dict[str, str]) -> str:
    from mlflow.entities import Param, RunTag

    all_tags = {"mlflow.runName": name, **tags}
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent
    run = tracker.client.create_run(tracker.experiment_id, run_name=name, tags=all_tags)
    run_id = run.info.run_id
    tracker.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                             tags=[RunTag(k, v) for k, v in tags.items()])
    return run_id


@contextmanager
def stage_run(cfg: ExperimentConfig, stage: str) -> Iterator[None]:
    """One MLflow run around a stage (nested in an enclosing stage's run); FAILED if it raises."""
    global _active
    if cfg.tracking.mlflow_uri is None:
        yield
        return
    outer = _active
    tracker = outer or _connect(cfg)
    parent = tracker.stack[-1] if tracker.stack else None
    run_id = _start(tracker, stage, parent, flatten(cfg.model_dump(mode="json")),
                    {"oodscale.stage": stage, "oodscale.experiment": cfg.name})
    tracker.stack.append(run_id)
    _active = tracker
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    finally:
        tracker.stack.pop()
        for key in [k for k in tracker.children if k[0] == run_id]:
            tracker.client.set_terminated(tracker.children.pop(key), status=status)
        tracker.client.set_terminated(run_id, status=status)
        _active = outer


def _child(name: str, params: dict[str, Any] | None = None) -> str | None:
    """The child run `name` of the current stage run, made on first use."""
    if _active is None or not _active.stack:
        return None
    parent = _active.stack[-1]
    key = (parent, name)
    if key not in _active.children:
        _active.children[key] = _start(_active, name, parent,
                                       {k: str(v) for k, v in (params or {}).items()},
                                       {"oodscale.classifier": name})
    return _active.children[key]


def log_metrics(metrics: dict[str, Any], step: int | None = None, child: str | None = None,
                params: dict[str, Any] | None = None) -> None:
    """Numeric `metrics` on the current stage run, or on its child run `child`."""
    if _active is None or not _active.stack:
        return
    from mlflow.entities import Metric

    run_id = _child(child, params) if child else _active.stack[-1]
    now = int(time.time() * 1000)
    batch = [Metric(re.sub(r"[^\w\-.]", "_", k), float(v), now, step or 0)
             for k, v in metrics.items()
             if isinstance(v, numbers.Real) and not isinstance(v, bool)]
    _active.client.log_batch(run_id, metrics=batch)


def epoch_logger(params: dict[str, dict[str, Any]] | None = None
                 ) -> Callable[[dict[str, Any]], None]:
    """`on_epoch` for oodscale.progress.epoch_progress: an item labelled with a classifier cell
    goes to that cell's child run (with `params[label]`), an unlabelled one to the stage run."""

    def log(item: dict[str, Any]) -> None:
        label = item.get("label") or None
        metrics = {k: v for k, v in item.items() if k not in ("label", "epoch")}
        log_metrics(metrics, step=int(item.get("epoch", 0)), child=label,
                    params=(params or {}).get(label) if label else None)

    return log


def log_results(layout: RunLayout) -> None:
    """Evaluate's results: a child run per classifier whose metrics are its results.parquet
    rows (`<score>.<ood set>.<metric>`, near/far means, ID accuracy), and the result files as
    artifacts of the stage run."""
    if _active is None or not _active.stack:
        return
    import pandas as pd

    storage = layout.storage
    results = pd.read_parquet(io.BytesIO(storage.read_bytes(
        f"{layout.eval_dir}/results.parquet")))
    for run, rows in results.groupby("run", sort=True):
        first = rows.iloc[0]
        metrics = {"id_acc": float(first["id_acc"])}
        for row in rows.itertuples():
            for name in RESULT_METRICS:
                metrics[_metric_key(row.score_name, row.ood_set, name)] = getattr(row, name)
        for (score, group), part in rows.groupby(["score_name", "group"]):
            for name in RESULT_METRICS:
                metrics[_metric_key(score, f"{group}_mean", name)] = float(part[name].mean())
        log_metrics(metrics, child=str(run), params={
            "loss": first["loss"], "outliers": first["outliers"], "seed": first["seed"]})
    with tempfile.TemporaryDirectory() as tmp:
        for name in RESULT_FILES:
            path = f"{layout.eval_dir}/{name}"
            if storage.exists(path):
                (Path(tmp) / name).write_bytes(storage.read_bytes(path))
                _active.client.log_artifact(_active.stack[-1], str(Path(tmp) / name))
