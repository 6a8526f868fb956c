"""Classifier checkpoints: safetensors weights plus a JSON card (never pickles)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from oodscale.classify.models import OODClassifier, build_classifier
from oodscale.data.streams import to_model_input
from oodscale.runtime import open_storage

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
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return model.eval(), card


class LoadedClassifier:
    """A finished classifier from any storage root, on this process's device, for inference."""

    def __init__(self, storage_root: str, classifier_dir: str, use_gpu: bool = False):
        storage = open_storage(storage_root)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        with tempfile.TemporaryDirectory() as tmp:
            model, self.card = load_classifier(storage.fetch_dir(classifier_dir, Path(tmp)))
        self.model = model.to(self.device)

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embeddings) on the CPU for C×H×W uint8 images."""
        x = to_model_input(torch.as_tensor(images)).to(self.device)
        logits, embeddings = self.model.embed_and_logits(x)
        return logits.float().cpu(), embeddings.float().cpu()
