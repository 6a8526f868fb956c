"""Classifier checkpoints: safetensors weights plus a JSON card (never pickles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from oodscale.classify.models import OODClassifier, build_classifier

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
