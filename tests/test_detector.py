"""The detector on real trained classifiers: the ID validation split, calibration, `Detector`,
`oodscale predict` and `oodscale status`, on a small digits experiment run by the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oodscale.cli import main
from oodscale.data.shards import load_arrays, read_manifest
from oodscale.data.validation import validation_indices
from oodscale.runtime import open_storage
from tests.experiment import RUN
from tests.support import CONFIG


def test_validation_indices_are_stratified_disjoint_and_fixed():
    labels = np.repeat(np.arange(4), [50, 30, 20, 100])
    train, val = validation_indices(labels, 0.1, seed=3)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 200
    assert np.bincount(labels[val]).tolist() == [5, 3, 2, 10]
    again = validation_indices(labels, 0.1, seed=3)
    assert np.array_equal(again[1], val) and not np.array_equal(
        validation_indices(labels, 0.1, seed=4)[1], val)
    assert len(validation_indices(labels, 0.0, seed=3)[1]) == 0
    with pytest.raises(ValueError, match="data.val_fraction"):
        validation_indices(np.array([0, 0, 1]), 0.5, seed=0)  # class 1 has one image


def _split(root: Path, name: str) -> np.ndarray:
    storage = open_storage(str(root))
    return load_arrays(storage, storage.path("digits", "data", *name.split("/")))[0]


@pytest.mark.integration
def test_val_split_is_held_out_of_training(digits_experiment):
    root, _ = digits_experiment
    storage = open_storage(str(root))
    train = read_manifest(storage, storage.path("digits", "data", "id", "train"))
    val = read_manifest(storage, storage.path("digits", "data", "id", "val"))
    assert (train.num_samples, val.num_samples) == (606, 152)  # 758 training digits 0-5
    assert train.extra["val_fraction"] == val.extra["val_fraction"] == 0.2
    train_images = {im.tobytes() for im in _split(root, "id/train")}
    overlap = sum(im.tobytes() in train_images for im in _split(root, "id/val"))
    assert overlap <= 2  # digits holds a few byte-identical images; a leak would be ~150


@pytest.mark.integration
def test_changing_val_fraction_after_prepare_is_refused(digits_experiment, capsys):
    _, overrides = digits_experiment
    assert main(["prepare", CONFIG, *overrides, "data.val_fraction=0.1"]) == 1
    err = capsys.readouterr().err
    assert "data.val_fraction=0.2" in err and "asks for 0.1" in err


@pytest.mark.integration
def test_calibration_is_stored_beside_the_weights(digits_experiment):
    root, _ = digits_experiment
    calibration = json.loads(
        (root / "digits" / "classifiers" / RUN / "calibration.json").read_text())
    assert calibration["tpr_target"] == 0.95 and calibration["default_score"] == "energy"
    assert calibration["set_on"] == {"split": "data/id/val", "images": 152}
    assert set(calibration["scores"]) == {"energy", "knn", "msp"}
    for name, entry in calibration["scores"].items():
        assert entry["val_accepted"] >= 0.95, name
        if name != "msp":  # MSP may tie at the top; these do not
            assert entry["val_accepted"] == 145 / 152, name  # the 8th lowest is the threshold


@pytest.mark.integration
def test_detector_flags_held_out_images_at_the_calibrated_rate(digits_experiment):
    from oodscale import Detector

    root, _ = digits_experiment
    # The held-out digits 6-9: without outlier exposure this 4-epoch CNN rates Gaussian noise
    # as ID under every score (far FPR95 100 % in its report), but tells unseen classes apart
    detector = Detector.load(root / "digits" / "classifiers" / RUN, score="knn")
    id_rate = detector.predict(_split(root, "id/test")).is_ood.mean()  # 325 unseen digits
    held_out_rate = detector.predict(_split(root, "ood/openset")).is_ood.mean()
    assert 0.01 <= id_rate <= 0.12, id_rate
    assert held_out_rate > max(0.5, 3 * id_rate), held_out_rate


@pytest.mark.integration
def test_detector_matches_evaluate(digits_experiment):
    """The detector's scores are evaluate's (scores.parquet), so the held-out digits (openset)
    are flagged at the rate the evaluation's own scores give at the calibrated threshold."""
    from oodscale import Detector

    root, _ = digits_experiment
    scores = pd.read_parquet(root / "digits" / "eval" / "scores.parquet")
    for name in ("energy", "knn"):
        detector = Detector.load(root / "digits" / "classifiers" / RUN, score=name)
        theirs = scores.query("score_name == @name")
        for dataset, split in (("id", "id/test"), ("openset", "ood/openset")):
            mine = detector.predict(_split(root, split))
            reported = theirs.loc[theirs["dataset"] == dataset, "score"].to_numpy()
            np.testing.assert_allclose(np.sort(mine.score), np.sort(reported), rtol=1e-4,
                                       atol=1e-4)
            assert mine.is_ood.sum() == (reported < detector.threshold).sum(), (name, dataset)


@pytest.mark.integration
def test_detector_keeps_its_tensors_on_the_device(digits_experiment):
    """Loaded, fitted (kNN) and scoring under the simulated accelerator: a host tensor beside
    a device one raises there as on a GPU (tests/device_sim.py)."""
    from oodscale import Detector
    from tests.device_sim import SimulatedAccelerator

    root, _ = digits_experiment
    digits = _split(root, "id/test")[:40]
    plain = Detector.load(root / "digits" / "classifiers" / RUN, score="knn").predict(digits)
    with SimulatedAccelerator():
        detector = Detector.load(root / "digits" / "classifiers" / RUN, score="knn")
        simulated = detector.predict(digits)
    np.testing.assert_allclose(simulated.score, plain.score, rtol=1e-5)


@pytest.mark.integration
def test_detector_defaults_to_the_score_the_validation_sets_chose(digits_experiment, tmp_path):
    from oodscale import Detector
    from oodscale.evaluate.report import primary_scores

    root, _ = digits_experiment
    chosen = primary_scores(pd.read_parquet(root / "digits" / "eval" / "val_results.parquet"))
    detector = Detector.load(root / "digits" / "classifiers" / RUN)
    assert detector.score_name == chosen["softmax"]
    assert "chosen on the validation sets" in detector.describe()
    # before evaluate has scored the validation sets: the calibration's default
    copy = tmp_path / "digits" / "classifiers" / RUN
    shutil.copytree(root / "digits" / "classifiers" / RUN, copy)
    fallback = Detector.load(copy)
    assert fallback.score_name == "energy" and "(detector.score)" in fallback.describe()


def _images(folder: Path, digits: np.ndarray) -> None:
    """Digits and noise in assorted sizes and modes, some in a subfolder."""
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, digit in enumerate(digits[:6]):
        Image.fromarray(digit[:, :, 0]).resize((40 + i, 40)).convert("RGB").save(
            folder / f"digit{i}.png")
    Image.fromarray(rng.integers(0, 256, (50, 30, 4), dtype=np.uint8)).save(
        folder / "sub" / "noise_rgba.png")
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).convert("P").save(
        folder / "sub" / "noise_palette.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        folder / "sub" / "noise.jpg")
    (folder / "notes.txt").write_text("not an image")


@pytest.mark.integration
def test_predict_scores_a_folder_of_any_images(digits_experiment, tmp_path, capsys):
    root, overrides = digits_experiment
    folder = tmp_path / "mine"
    _images(folder, _split(root, "id/test"))
    out = tmp_path / "rows.csv"
    assert main(["predict", CONFIG, *overrides, "--run", RUN, str(folder), "--out",
                 str(out)]) == 0
    rows = pd.read_csv(out)
    assert list(rows.columns) == ["path", "score", "is_ood", "pred", "error"]
    assert rows["error"].isna().all()
    assert len(rows) == 9 and rows["path"].str.endswith("notes.txt").sum() == 0
    from oodscale import Detector

    threshold = Detector.load(root / "digits" / "classifiers" / RUN).threshold  # same default
    assert (rows["is_ood"] == (rows["score"] < threshold)).all()
    assert set(rows["pred"].astype(str)) <= set("012345")
    assert "flagged OOD" in capsys.readouterr().out
    parquet = tmp_path / "rows.parquet"
    assert main(["predict", CONFIG, *overrides, "--run", RUN, "--score", "knn",
                 str(folder / "digit0.png"), "--out", str(parquet)]) == 0
    assert len(pd.read_parquet(parquet)) == 1


@pytest.mark.integration
def test_predict_errors_name_the_problem(digits_experiment, tmp_path, capsys):
    root, overrides = digits_experiment
    image = tmp_path / "ok.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    base = ["predict", CONFIG, *overrides, "--out", str(tmp_path / "x.csv")]
    assert main([*base, "--run", "nope-s0", str(image)]) == 1
    assert "'nope-s0'" in (err := capsys.readouterr().err) and RUN in err
    assert main([*base, "--run", RUN, "--score", "maxcos", str(image)]) == 1
    assert "calibrated: " in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main([*base, "--run", RUN, str(image), str(broken)]) == 1
    assert str(broken) in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()  # no half-written output
    assert main([*base, "--run", RUN, str(tmp_path / "absent.png")]) == 1
    assert "absent.png not found" in capsys.readouterr().err


@pytest.mark.integration
def test_detector_without_current_calibration_names_the_command(digits_experiment, tmp_path):
    from oodscale import Detector

    root, _ = digits_experiment
    copy = tmp_path / "digits" / "classifiers" / RUN
    shutil.copytree(root / "digits" / "classifiers" / RUN, copy)
    calibration = json.loads((copy / "calibration.json").read_text())
    (copy / "calibration.json").unlink()
    with pytest.raises(FileNotFoundError, match="oodscale calibrate"):
        Detector.load(copy)
    (copy / "calibration.json").write_text(json.dumps({**calibration,
                                                       "weights_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="retrained"):
        Detector.load(copy)


@pytest.mark.integration
def test_status_of_a_partly_run_experiment(digits_experiment, tmp_path):
    """A copy of the experiment with one OOD set, the classifier, its last checkpoint and half
    the synthetic shards gone: status reads what is there, says what a rerun does, and starts
    no Ray."""
    from oodscale.config import load_config
    from oodscale.data.shards import Manifest, ShardInfo, write_manifest
    from oodscale.outlier_sources import synthetic_dirname
    from oodscale.runtime import layout_for
    from oodscale.status import MISSING, PARTIAL, experiment_status

    root, overrides = digits_experiment
    shutil.copytree(root / "digits", tmp_path / "digits")
    shutil.rmtree(tmp_path / "digits" / "data" / "ood" / "gaussian")
    shutil.rmtree(tmp_path / "digits" / "classifiers" / RUN)
    # as if the run had stopped after epoch 3: its last checkpoint (epoch 4) never written
    shutil.rmtree(max((tmp_path / "digits" / "ray_train" / "digits-classifiers"
                       ).glob("checkpoint_2*")))
    moved = [f"storage.root={tmp_path}", *overrides[1:], "train.outliers=[none,labelmix]",
             "generate.num_shards=4"]
    cfg = load_config(CONFIG, moved)
    layout = layout_for(cfg)
    write_manifest(layout.storage, layout.synthetic_variant(synthetic_dirname(3.0)), Manifest(
        "synthetic", "labelmix", 16, 1, list("012345"),
        shards=[ShardInfo(f"labelmix-{i:06d}.tar", 12, "0" * 64) for i in (0, 2)]))
    stages = {s.stage: s for s in experiment_status(cfg, layout)}
    assert stages["prepare"].state == PARTIAL and "ood/gaussian" in stages["prepare"].rerun
    assert stages["train-diffusion"].state == MISSING
    assert stages["generate"].state == PARTIAL and "2 of 4" in stages["generate"].detail
    assert "draws the 2 missing" in stages["generate"].rerun
    train = stages["train"]
    assert train.state == PARTIAL and f"{RUN} at epoch 3 of 4" in train.detail
    assert train.rerun == f"trains 2 classifier(s), resuming {RUN} at epoch 4"
    assert stages["calibrate"].state == MISSING and stages["evaluate"].state == PARTIAL
    assert "refuses until every grid cell is trained" in stages["evaluate"].rerun
    assert {s.state for s in stages.values()} == {PARTIAL, MISSING}  # nothing FINISHED here
    script = ("import ray, sys; from oodscale.cli import main; "
              f"code = main(['status', {CONFIG!r}, *{moved!r}]); "
              "sys.exit(code or int(ray.is_initialized()))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout and "rerun: draws the 2 missing" in done.stdout
