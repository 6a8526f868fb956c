"""A classifier's `calibration.json`: reading it, and whether it is current.

Light on purpose (no torch): `oodscale status` asks `is_current`, the detector reads it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from oodscale.classify.cards import WEIGHTS
from oodscale.config import ExperimentConfig
from oodscale.errors import InputError, MissingError
from oodscale.runtime import Storage

CALIBRATION = "calibration.json"
CALIBRATE_HINT = "run `oodscale calibrate CONFIG` (or `oodscale run CONFIG`) to make one"


def weights_sha256(storage: Storage, classifier_dir: str) -> str:
    return hashlib.sha256(storage.read_bytes(f"{classifier_dir}/{WEIGHTS}")).hexdigest()


def read_calibration(storage: Storage, classifier_dir: str) -> dict[str, Any]:
    """The classifier's calibration; missing or made for other weights is a clear error."""
    path = f"{classifier_dir}/{CALIBRATION}"
    if not storage.exists(path):
        raise MissingError(f"{storage.uri_of(classifier_dir)} has no {CALIBRATION} (no "
                                f"decision threshold yet); {CALIBRATE_HINT}")
    calibration = json.loads(storage.read_bytes(path))
    if calibration["weights_sha256"] != weights_sha256(storage, classifier_dir):
        raise InputError(f"{storage.uri_of(path)} was set for other weights (the classifier "
                         f"was retrained since); {CALIBRATE_HINT}")
    return calibration


def calibration_names(cfg: ExperimentConfig) -> list[str]:
    """The scores to calibrate: the detector's default, then every score evaluate reports."""
    return list(dict.fromkeys([cfg.detector.score, *cfg.evaluate.scores]))


def is_current(storage: Storage, classifier_dir: str, cfg: ExperimentConfig) -> bool:
    """Whether the stored calibration matches these weights, this target and these scores."""
    try:
        calibration = read_calibration(storage, classifier_dir)
    except (FileNotFoundError, ValueError):
        return False
    return (calibration["tpr_target"] == cfg.detector.tpr
            and calibration["default_score"] == cfg.detector.score
            and set(calibration_names(cfg)) <= set(calibration["scores"]))
