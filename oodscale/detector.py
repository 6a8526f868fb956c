"""Using a trained classifier as an OOD detector: scores and yes/no decisions for any images.

    from oodscale import Detector
    detector = Detector.load("runs/digits/classifiers/arcface-labelmix-s0", score="energy")
    result = detector.predict(["photo.jpg", pil_image, uint8_array])
    result.score, result.is_ood, result.pred

Images of any size and mode are converted and resized exactly as `prepare` made the training
shards; the threshold is the one `oodscale calibrate` stored beside the weights (it accepts
`detector.tpr` of the ID validation images).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from oodscale.classify.checkpoints import CARD
from oodscale.data.builtin import resize
from oodscale.data.images import DEFAULT_LIMITS, ImageLimits, read_image_bytes
from oodscale.data.sources import decode_image
from oodscale.errors import InputError
from oodscale.evaluate.calibration import ScoreReader
from oodscale.evaluate.calibration_card import read_calibration
from oodscale.runtime import Storage, open_storage

ImageLike = str | Path | Storage | Image.Image | np.ndarray  # Storage: a file as (fs, path)


@dataclass
class Prediction:
    """Per image: the score (higher = more ID), the decision, and the predicted ID class."""

    score: np.ndarray
    is_ood: np.ndarray
    pred: np.ndarray


def _from_array(array: np.ndarray, size: int, channels: int, source: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InputError(f"image {source} is {array.dtype}; pass uint8 pixels (0-255)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(f"image {source} has shape {array.shape}; expected H×W, H×W×3 or "
                         f"H×W×4")
    return resize(array, size, channels)


def training_images(images: Iterable[ImageLike] | np.ndarray, size: int, channels: int,
                    limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """N×C×H×W uint8, each image converted and resized as `prepare` does for training data.

    Items may be file paths (any storage URI, or a Storage whose base is the file), PIL images
    or uint8 arrays; an array with a
    batch axis (N×H×W or N×H×W×C) is N images. Files are checked against `limits` before
    they are read and decoded (`oodscale.data.images`).
    """
    out = []
    for i, item in enumerate(images):
        if isinstance(item, str | Path | Storage):
            storage = open_storage(item if isinstance(item, Storage) else str(item))
            source = storage.uri if isinstance(item, Storage) else str(item)
            data = read_image_bytes(storage, storage.base, limits, source)
            image = decode_image(data, size, channels, source, limits)
        elif isinstance(item, Image.Image):
            mode = "L" if channels == 1 else "RGB"
            image = resize(np.asarray(item.convert(mode)), size, channels)
        elif isinstance(item, np.ndarray):
            image = _from_array(item, size, channels, f"#{i}")
        else:
            raise TypeError(f"image #{i} is a {type(item).__name__}; pass a path, a PIL image "
                            f"or a uint8 array")
        out.append(image.transpose(2, 0, 1))
    if not out:
        return np.zeros((0, channels, size, size), np.uint8)
    return np.stack(out)


def validation_choice(storage: Storage, classifier_dir: str, loss: str) -> str | None:
    """The primary score the report chose for `loss` on the validation sets alone
    (eval/val_results.parquet), or None before evaluate has scored them."""
    import pandas as pd

    from oodscale.evaluate.report import primary_scores

    path = f"{classifier_dir.rsplit('/', 2)[0]}/eval/val_results.parquet"
    if not storage.exists(path):
        return None
    return primary_scores(pd.read_parquet(io.BytesIO(storage.read_bytes(path)))).get(loss)


class Detector:
    """A finished, calibrated classifier with one score and its threshold."""

    def __init__(self, reader: ScoreReader, calibration: dict[str, Any], score: str,
                 batch_size: int, chosen: str = "asked for",
                 limits: ImageLimits = DEFAULT_LIMITS) -> None:
        self.reader, self.calibration, self.score_name = reader, calibration, score
        self.threshold = float(calibration["scores"][score]["threshold"])
        self.batch_size, self.chosen = batch_size, chosen  # chosen: how the score was picked
        self.limits = limits  # checked before an image file is read and decoded
        card = reader.classifier.card
        self.run, self.class_names = card["run"], card["class_names"]
        self.image_size, self.channels = card["image_size"], card["channels"]

    @classmethod
    def load(cls, classifier_dir: str | Path | Storage, score: str | None = None,
             use_gpu: bool | None = None, batch_size: int = 256,
             limits: ImageLimits = DEFAULT_LIMITS) -> Detector:
        """The classifier under `classifier_dir` (`<root>/<experiment>/classifiers/<run>`, a
        local path or URI) with `score`, on the GPU when there is one.

        Without `score`: the report's primary score for the classifier's loss when evaluate
        has chosen one on the validation sets, else the calibration's default
        (`detector.score`).
        """
        storage = open_storage(classifier_dir if isinstance(classifier_dir, Storage)
                               else str(classifier_dir))  # a Storage is not parsed again
        calibration = read_calibration(storage, storage.base)
        chosen = "asked for"
        if score is None:
            loss = json.loads(storage.read_bytes(f"{storage.base}/{CARD}"))["loss"]
            score = validation_choice(storage, storage.base, loss)
            chosen = f"the report's primary score for {loss}, chosen on the validation sets"
            if score not in calibration["scores"]:
                score, chosen = calibration["default_score"], "detector.score"
        if score not in calibration["scores"]:
            raise InputError(f"score {score!r} has no calibrated threshold for "
                             f"{classifier_dir}; calibrated: {', '.join(calibration['scores'])} "
                             f"(add it to evaluate.scores and run `oodscale calibrate CONFIG`)")
        gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
        reader = ScoreReader(storage, storage.base, [score], gpu, batch_size)
        return cls(reader, calibration, score, batch_size, chosen, limits)

    def predict_prepared(self, batch: np.ndarray) -> Prediction:
        """`predict` for images already at the model's size (N×C×H×W uint8, as
        `training_images` gives), in batches of `batch_size`."""
        scores, preds = [np.zeros(0)], [np.zeros(0, np.int64)]
        for start in range(0, len(batch), self.batch_size):
            values, pred = self.reader(batch[start:start + self.batch_size])
            scores.append(values[self.score_name])
            preds.append(pred)
        score = np.concatenate(scores)
        return Prediction(score=score, is_ood=score < self.threshold, pred=np.concatenate(preds))

    def predict(self, images: Sequence[ImageLike] | np.ndarray) -> Prediction:
        """Score, OOD decision (score below the calibrated threshold) and predicted class."""
        return self.predict_prepared(training_images(images, self.image_size, self.channels,
                                                     self.limits))

    def score(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """The score of each image (higher = more ID)."""
        return self.predict(images).score

    def describe(self) -> str:
        """How the threshold was set, in one line."""
        c = self.calibration
        return (f"{self.run}, score {self.score_name} ({self.chosen}): OOD below "
                f"{self.threshold:.4g}, set to "
                f"accept {100 * c['tpr_target']:.0f}% of {c['set_on']['images']} ID validation "
                f"images ({c['set_on']['split']}; accepted "
                f"{100 * c['scores'][self.score_name]['val_accepted']:.1f}%)")

