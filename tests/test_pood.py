"""pytorch-ood detectors as `pood:<Name>` scores: names, the head as a linear layer, fitting and
shipping, and (integration) the evaluate stage on trained classifiers, report.html included."""

from __future__ import annotations

import importlib.util
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from oodscale.classify.loss_table import LOSS_NAMES
from oodscale.classify.losses import SoftmaxHead
from oodscale.classify.models import OODClassifier, build_backbone, build_classifier
from oodscale.config import ConfigError, load_config
from oodscale.evaluate.detectors import ScoreSet, fit_train
from oodscale.evaluate.pood import linear_view
from tests.experiment import RUN, SMALL
from tests.support import CONFIG

FITTED = ["pood:ViM", "pood:ReAct", "pood:NNGuide", "pood:KNN", "pood:KLMatching", "pood:DICE"]


def _model(loss: str = "softmax") -> OODClassifier:
    torch.manual_seed(0)
    return build_classifier("smallcnn", loss, 1, 16, 4, 8).eval()


def _data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=gen) * 2 - 1, torch.arange(n) % 4


def test_an_unknown_pood_name_is_a_config_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match=r"pood:Nope.*valid names: pood:MaxSoftmax.*pood:ViM"):
        load_config(CONFIG, ["evaluate.scores=[msp,pood:Nope]"])
    cfg = load_config(CONFIG, ["evaluate.scores=[msp,pood:ViM,pood:ReAct]"])
    assert cfg.evaluate.scores == ["msp", "pood:ViM", "pood:ReAct"]


def test_a_pood_score_without_pytorch_ood_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytorch_ood" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pood:ViM.*oodscale\[pood\]"):
        load_config(CONFIG, ["evaluate.scores=[pood:ViM]"])
    load_config(CONFIG, ["evaluate.scores=[msp,knn]"])  # built-ins need nothing more


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_the_linear_view_reproduces_every_heads_logits(loss):
    model = _model(loss)
    with torch.no_grad():
        acts = model.activations(_data()[0])
        view = linear_view(model, acts.embeddings)
        rebuilt = view.features(acts.embeddings) @ view.weight.T + view.bias
    torch.testing.assert_close(rebuilt, acts.logits.float(), rtol=1e-4, atol=1e-3)
    assert view.normalise == (loss not in ("softmax", "sphereface"))


def test_a_head_that_is_not_linear_is_refused():
    class SquaredHead(SoftmaxHead):
        def logits(self, embeddings):
            return super().logits(embeddings) ** 2

    model = OODClassifier(build_backbone("smallcnn", 1, 16, 8), SquaredHead(8, 4)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="not linear"):
        linear_view(model, model.activations(_data()[0]).embeddings)


def test_pytorch_ood_scores_are_negated_to_higher_is_id():
    model = _model()
    with torch.no_grad():
        acts = model.activations(_data()[0])
        out = ScoreSet(["msp", "energy", "pood:MaxSoftmax", "pood:EnergyBased"], model, None)(
            acts)
    np.testing.assert_allclose(out["pood:MaxSoftmax"], out["msp"], rtol=1e-5)
    np.testing.assert_allclose(out["pood:EnergyBased"], out["energy"], rtol=1e-5)


def test_a_fitted_score_needs_its_fit():
    with pytest.raises(ValueError, match=r"pood:ViM.*fit_train"):
        ScoreSet(["msp", "pood:ViM"], _model(), None)


def test_fitted_detectors_ship_to_a_fresh_process_and_score_the_same(tmp_path):
    """As the evaluate stage does: fit once, pickle (Ray's object store), score elsewhere."""
    model = _model()
    train, labels = _data()
    test, _ = _data(16, seed=1)
    with torch.no_grad():
        fitted = fit_train(FITTED, model, model.activations(train), labels)
        here = ScoreSet(FITTED, model, pickle.loads(pickle.dumps(fitted)))(model.activations(test))
    payload = tmp_path / "fit.pkl"
    payload.write_bytes(pickle.dumps((model.state_dict(), fitted, test)))
    script = f"""
import pickle, sys, torch
from oodscale.classify.models import build_classifier
from oodscale.evaluate.detectors import ScoreSet
state, fitted, test = pickle.loads(open({str(payload)!r}, "rb").read())
model = build_classifier("smallcnn", "softmax", 1, 16, 4, 8).eval()
model.load_state_dict(state)
with torch.no_grad():
    out = ScoreSet({FITTED!r}, model, fitted)(model.activations(test))
pickle.dump(out, sys.stdout.buffer)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    there = pickle.loads(done.stdout)
    for name in FITTED:
        assert np.isfinite(here[name]).all(), name
        np.testing.assert_allclose(there[name], here[name], rtol=1e-6, err_msg=name)


# --- the evaluate stage on trained classifiers ---------------------------------------------

POOD_SCORES = ("evaluate.scores=[msp,energy,pood:MaxSoftmax,pood:EnergyBased,pood:ViM,"
               "pood:ReAct,pood:NNGuide]")


@pytest.fixture(scope="module")
def pood_eval(digits_experiment, tmp_path_factory):
    """The shared trained experiment, copied and evaluated again with pytorch-ood's scores."""
    from oodscale.cli import main

    source, _ = digits_experiment
    root = tmp_path_factory.mktemp("pood")
    shutil.copytree(source / "digits", root / "digits")
    moved = [f"storage.root={root}", *SMALL, POOD_SCORES]
    assert main(["evaluate", CONFIG, *moved]) == 0
    return root / "digits" / "eval"


@pytest.mark.integration
def test_pytorch_ood_msp_and_energy_agree_with_ours_on_trained_classifiers(pood_eval):
    scores = pd.read_parquet(pood_eval / "scores.parquet")
    wide = scores.assign(row=scores.groupby(["run", "score_name"]).cumcount()).pivot(
        index=["run", "row"], columns="score_name", values="score")
    assert set(wide.index.get_level_values("run")) == {RUN}
    np.testing.assert_allclose(wide["pood:MaxSoftmax"], wide["msp"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(wide["pood:EnergyBased"], wide["energy"], rtol=1e-5)


@pytest.mark.integration
def test_fitted_pytorch_ood_detectors_run_in_the_evaluate_stage(pood_eval):
    results = pd.read_parquet(pood_eval / "results.parquet")
    for name in ("pood:ViM", "pood:ReAct", "pood:NNGuide"):
        part = results[results["score_name"] == name]
        assert len(part) == 2, name  # 1 run x 2 OOD sets
        assert part["auroc"].between(0, 100).all(), name
    scores = pd.read_parquet(pood_eval / "scores.parquet")
    assert np.isfinite(scores["score"]).all()
    # Gaussian noise is far from digits: ViM on the softmax run finds it.
    vim = results[(results["score_name"] == "pood:ViM") & (results["loss"] == "softmax")]
    assert vim.loc[vim["ood_set"] == "gaussian", "auroc"].item() > 90


@pytest.mark.integration
def test_the_evaluate_stages_report_html_opens_cleanly(pood_eval):
    from oodscale.evaluate.report_check import check_report

    page = (pood_eval / "report.html").read_text()
    assert f"classifier {RUN}" in page and "pood:ViM" in page
    assert check_report(pood_eval / "report.html") == []
