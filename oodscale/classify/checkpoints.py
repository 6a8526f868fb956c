"""Classifier checkpoints: safetensors weights plus a JSON card (never pickles)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from safetensors.torch import save_file

from oodscale.classify.models import Activations, OODClassifier, build_classifier
from oodscale.data.streams import to_model_input
from oodscale.devices import worker_device
from oodscale.runtime import Storage, open_storage
from oodscale.weights import load_weights

WEIGHTS = "model.safetensors"
CARD = "classifier.json"  # written last: its presence means the run finished


def save_classifier(model: OODClassifier, card: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    (directory / CARD).write_text(json.dumps(card, indent=2, sort_keys=True))


def classifier_from_card(card: dict[str, Any]) -> OODClassifier:
    return build_classifier(card["backbone"], card["loss"], card["channels"], card["image_size"],
                            card["num_classes"], card["embedding_dim"], card["head_options"])


def load_classifier(directory: Path) -> tuple[OODClassifier, dict[str, Any]]:
    """The model in eval mode and its card, from a local checkpoint directory."""
    card_path = directory / CARD
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path} missing: that classifier run did not finish; "
                                f"rerun `oodscale train`")
    card = json.loads(card_path.read_text())
    model = classifier_from_card(card)
    model.load_state_dict(load_weights(directory / WEIGHTS))
    return model.eval(), card


class LoadedClassifier:
    """A finished classifier from any storage root, on this worker's device, for inference."""

    def __init__(self, storage_root: str, classifier_dir: str, use_gpu: bool = False):
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


def trained_runs(storage: Storage, classifiers_dir: str) -> list[str]:
    """Names of the finished classifiers (those with a card) under `classifiers_dir`, sorted:
    this grid's and any earlier grid's of the same experiment."""
    if not storage.exists(classifiers_dir):
        return []
    infos = storage.fs.get_file_info(pafs.FileSelector(classifiers_dir))
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and storage.exists(f"{i.path}/{CARD}"))
