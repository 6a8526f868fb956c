import os
import re

import numpy as np
import pytest

from oodscale.evaluate.metrics import ood_metrics
from oodscale.evaluate.report import aggregate, summary_table, write_report
from tests.report_data import GROUPS, toy_scores

EXPECTED_COLUMNS = [
    "run", "loss", "outliers", "seed", "score_name", "ood_set", "group",
    "fpr95", "auroc", "aupr_in", "aupr_out", "fpr95_id_positive", "id_acc",
]


def test_aggregate_rows_and_columns():
    scores = toy_scores()
    results = aggregate(scores, GROUPS)
    assert list(results.columns) == EXPECTED_COLUMNS
    assert len(results) == 8 * 2 * 3
    assert dict(zip(results["ood_set"], results["group"], strict=True)) == {
        "held_out": "near", "noise": "far", "textures": "far",
    }
    assert (results["id_acc"] == 90.0).all()
    row = results[(results["run"] == "softmax-none-s1") & (results["score_name"] == "msp")
                  & (results["ood_set"] == "noise")].iloc[0]
    sel = scores[(scores["run"] == "softmax-none-s1") & (scores["score_name"] == "msp")]
    expected = ood_metrics(sel.loc[sel["dataset"] == "id", "score"].to_numpy(),
                           sel.loc[sel["dataset"] == "noise", "score"].to_numpy())
    assert row["auroc"] == pytest.approx(expected["auroc"])
    assert row["fpr95"] == pytest.approx(expected["fpr95"])


def test_aggregate_rejects_bad_group():
    with pytest.raises(ValueError, match="near"):
        aggregate(toy_scores(seeds=(0,)), {"noise": "middle"})


def test_summary_table_formats():
    results = aggregate(toy_scores(), GROUPS)
    table = summary_table(results)
    assert len(table) == 2 * 2 * 2
    assert list(table.columns[:3]) == ["loss", "outliers", "score_name"]
    assert "near FPR95" in table.columns and "far AUROC" in table.columns
    assert "ID acc" in table.columns
    assert re.fullmatch(r"\d+\.\d ± \d+\.\d", table["near FPR95"].iloc[0])
    best = table[(table["loss"] == "arcface") & (table["outliers"] == "labelmix")]
    assert (best["near FPR95"] == "0.0 ± 0.0").all()
    single = summary_table(aggregate(toy_scores(seeds=(0,)), GROUPS))
    assert "±" not in single["far AUROC"].iloc[0]
    assert single["ID acc"].iloc[0] == "90.0"


def test_validation_results_choose_the_primary_score(tmp_path):
    scores = toy_scores()
    results = aggregate(scores, GROUPS)
    test_best = write_report(results, scores, str(tmp_path / "a"), "On test")
    assert "the test sets themselves" in (tmp_path / "a" / "report.md").read_text()
    # Validation results in which maxcos beats msp for every loss (and the test results unused).
    val = results.copy()
    val["fpr95"] = np.where(val["score_name"] == "maxcos", 1.0, 99.0)
    chosen = write_report(results, scores, str(tmp_path / "b"), "On val", selection=val)
    text = (tmp_path / "b" / "report.md").read_text()
    assert "validation sets alone" in text and "arcface: `maxcos`" in text
    # OpenOOD's protocol takes any score; the paper's only the head's own (softmax: msp)
    assert "softmax: `maxcos`" in text and "softmax: `msp`" in text
    assert chosen != test_best


def test_write_report(tmp_path):
    scores = toy_scores()
    results = aggregate(scores, GROUPS)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"not really a png")
    out = tmp_path / "eval"
    summary = write_report(results, scores, str(out), "Test report", {"Outlier grid": str(grid)},
                           set_sources={"textures": "10 shipped images"})
    text = (out / "report.md").read_text()
    # each test set's size and sources are stated
    assert "| textures | far | 15 | 10 shipped images |" in text and "| id | ID | 20 | - |" in text
    assert text.startswith("# Test report")
    assert "OOD is the positive class" in text and "higher score = more in-distribution" in text
    assert "Main table, paper protocol" in summary and "The paper's claims" in summary
    # Bold only where a paired interval excludes zero: the perfectly separated cell, against
    # both of its references, and nothing else.
    bold_rows = [r for r in text.splitlines() if r.startswith("|") and "**" in r]
    assert bold_rows and all(r.startswith("| arcface-labelmix") for r in bold_rows)
    pngs = sorted(os.listdir(out / "plots"))
    assert "fpr95_outliers_paper.png" in pngs and "paired_fpr95_openood.png" in pngs
    assert any(p.startswith("roc_") for p in pngs) and any(p.startswith("hist_") for p in pngs)
    for link in re.findall(r"\]\(([^)]+)\)", text):
        path = out / link
        assert path.is_file() and path.stat().st_size > 0, link
    assert "../grid.png" in text


def test_the_generators_sample_quality_is_reported(tmp_path):
    scores = toy_scores(seeds=(0,))
    quality = {"reference_test_accuracy": 99.4, "conditional_accuracy": 98.3,
               "frechet_distance": 6.3, "mix_weaker_share": 0.09, "class_samples": 60,
               "mix_samples": 60, "reference": "smallcnn softmax"}
    write_report(aggregate(scores, GROUPS), scores, str(tmp_path), "T", quality=quality)
    text = (tmp_path / "report.md").read_text()
    assert "## Generator sample quality" in text
    assert "| (a) its accuracy on class-conditional samples (%) | 98.3 |" in text
    assert "| (b) Fréchet distance, samples vs ID test images, in its embedding | 6.3 |" in text
    write_report(aggregate(scores, GROUPS), scores, str(tmp_path / "none"), "T")
    assert "sample quality" not in (tmp_path / "none" / "report.md").read_text()
