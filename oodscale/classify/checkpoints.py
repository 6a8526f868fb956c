"""Classifier checkpoints: safetensors weights plus a JSON card (never pickles)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from oodscale.classify.backbone_table import check_backbone
from oodscale.classify.cards import CARD, WEIGHTS
from oodscale.classify.loss_table import check_loss_options
from oodscale.classify.losses import build_head
from oodscale.classify.models import Activations, OODClassifier, build_backbone, build_classifier
from oodscale.data.streams import to_model_input
from oodscale.devices import worker_device
from oodscale.errors import InputError, MissingError
from oodscale.runtime import StorageRoot, open_storage
from oodscale.weights import load_weights, require_safetensors


def save_classifier(model: OODClassifier, card: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    (directory / CARD).write_text(json.dumps(card, indent=2, sort_keys=True))


def classifier_from_card(card: dict[str, Any]) -> OODClassifier:
    return build_classifier(card["backbone"], card["loss"], card["channels"], card["image_size"],
                            card["num_classes"], card["embedding_dim"], card["head_options"])


# What a card may say, checked before anything is built from it: (lowest, highest).
CARD_NUMBERS = {"channels": (1, 3), "image_size": (8, 1024), "num_classes": (2, 1_000_000),
                "embedding_dim": (2, 65_536)}


def _card_problem(card: Any) -> str | None:
    """What makes a card unusable before its weights are even looked at, or None."""
    if not isinstance(card, dict):
        return "it is not a JSON object"
    missing = [k for k in ("backbone", "loss", "head_options", *CARD_NUMBERS) if k not in card]
    if missing:
        return f"it lacks {', '.join(missing)}"
    for key, (low, high) in CARD_NUMBERS.items():
        value = card[key]
        if type(value) is not int or not low <= value <= high:
            return f"{key} {value!r} is not an integer in [{low}, {high}]"
    options = card["head_options"]
    if not isinstance(options, dict) or not all(
            type(v) in (int, float) and math.isfinite(v) and abs(v) <= 1e6
            for v in options.values()):
        return f"head_options {options!r} are not finite numbers"
    try:
        check_backbone(card["backbone"])
        check_loss_options(card["loss"], options)
    except (ValueError, TypeError) as err:
        return str(err)
    names = card.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != card["num_classes"]):
        return f"class_names do not list num_classes ({card['num_classes']}) names"
    return None


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a safetensors header (no tensor is read)."""
    require_safetensors(path)
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {f"{prefix}{k}": tuple(v.shape) for k, v in module.state_dict().items()}


def _card_shapes(card: dict[str, Any], header: dict[str, tuple[int, ...]],
                 ) -> dict[str, tuple[int, ...]] | None:
    """The tensor shapes the card's model has, built on the meta device (no memory), or None
    where its head cannot be built there (pml's SphereFace computes constants with numpy):
    then the head is built for real only when its weights fit those the header lists."""
    with torch.device("meta"):
        backbone = build_backbone(card["backbone"], card["channels"], card["image_size"],
                                  card["embedding_dim"])
        try:
            head = build_head(card["loss"], card["embedding_dim"], card["num_classes"],
                              card["head_options"])
        except (TypeError, RuntimeError, NotImplementedError):
            head = None
    if head is None:
        listed = sum(math.prod(s) for k, s in header.items() if k.startswith("head."))
        if card["embedding_dim"] * card["num_classes"] > listed:
            return None
        head = build_head(card["loss"], card["embedding_dim"], card["num_classes"],
                          card["head_options"])
    return {**_shapes(backbone, "backbone."), **_shapes(head, "head.")}


def check_card(card: Any, directory: Path) -> dict[str, Any]:
    """Refuse a card that does not describe the weights beside it, before a model is built:
    its values are checked, then the shapes of the model it describes (built on the meta
    device) against the safetensors header."""
    card_path, weights = directory / CARD, directory / WEIGHTS
    problem = _card_problem(card)
    header = header_shapes(weights)
    if problem is None:
        expected = _card_shapes(card, header)
        if expected is None:
            problem = (f"its head ({card['embedding_dim']} x {card['num_classes']}) is larger "
                       f"than the head weights {weights.name} holds")
        elif expected != header:
            key = next(k for k in sorted(expected.keys() | header.keys())
                       if expected.get(k) != header.get(k))
            problem = (f"tensor {key} is {header.get(key, 'absent')} in {weights.name} but "
                       f"{expected.get(key, 'absent')} in the model the card describes")
    if problem is not None:
        raise InputError(f"{card_path} does not describe the weights beside it: {problem}; "
                         f"the card or the weights were altered or mixed up. Delete "
                         f"{directory} and rerun `oodscale train`")
    return card


def load_classifier(directory: Path) -> tuple[OODClassifier, dict[str, Any]]:
    """The model in eval mode and its card, from a local checkpoint directory; the card is
    checked against the weights' header before the model is built (`check_card`)."""
    card_path = directory / CARD
    if not card_path.is_file():
        raise MissingError(f"{card_path} missing: that classifier run did not finish; "
                                f"rerun `oodscale train`")
    try:
        card = json.loads(card_path.read_text())
    except ValueError as err:
        raise InputError(f"{card_path} is not valid JSON ({err}); delete {directory} and "
                         f"rerun `oodscale train`") from None
    model = classifier_from_card(check_card(card, directory))
    model.load_state_dict(load_weights(directory / WEIGHTS))
    return model.eval(), card


class LoadedClassifier:
    """A finished classifier from any storage root, on this worker's device, for inference."""

    def __init__(self, storage_root: StorageRoot, classifier_dir: str, use_gpu: bool = False):
        storage = open_storage(storage_root)
        self.device = worker_device(use_gpu)
        with tempfile.TemporaryDirectory() as tmp:
            model, self.card = load_classifier(storage.fetch_dir(classifier_dir, Path(tmp)))
        self.model = model.to(self.device)

    @torch.no_grad()
    def embed_on_device(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embeddings) on the model's device for C×H×W uint8 images.

        The images travel as uint8 (a quarter of float32's bytes) and become floats there.
        """
        return self.model.embed_and_logits(self._model_input(images))

    @torch.no_grad()
    def activations_on_device(self, images: np.ndarray) -> Activations:
        """Logits, embeddings and pooled penultimate activations on the model's device."""
        return self.model.activations(self._model_input(images))

    def _model_input(self, images: np.ndarray) -> torch.Tensor:
        return to_model_input(torch.as_tensor(images).to(self.device, non_blocking=True))

    def embed(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embeddings) as float32 on the CPU."""
        logits, embeddings = self.embed_on_device(images)
        return logits.float().cpu(), embeddings.float().cpu()
