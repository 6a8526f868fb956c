"""Paired cells: two cells of one seed and loss differ only by their outlier source."""

from __future__ import annotations

import torch

from oodscale.classify.train import RunSpec, _card, initial_classifier, pair_seed
from oodscale.config import load_config
from oodscale.data.shards import Manifest
from oodscale.data.streams import reshuffled_batches
from tests.experiment import CONFIG

MANIFEST = Manifest(kind="id", split="train", image_size=16, channels=1,
                    class_names=[str(c) for c in range(6)])


def _cards(loss: str, seed: int) -> dict[str, dict]:
    cfg = load_config(CONFIG, ["train.embedding_dim=16"])
    return {source: _card(cfg, RunSpec(loss, source, seed), MANIFEST)
            for source in ("none", "labelmix")}


def _first_id_batch(card: dict, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    return next(reshuffled_batches(rows, 8, pair_seed(card, "id", 0)))["label"]


def test_paired_cells_share_initial_weights_and_first_id_batches():
    rows = {"image": torch.zeros(64, 1, 16, 16, dtype=torch.uint8),
            "label": torch.arange(64)}
    for loss in ("softmax", "arcface"):
        none, labelmix = _cards(loss, seed=0).values()
        a, b = initial_classifier(none).state_dict(), initial_classifier(labelmix).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), loss
        assert torch.equal(_first_id_batch(none, rows), _first_id_batch(labelmix, rows))


def test_paired_seeds_still_differ_by_seed_and_loss():
    """The pairing key keeps what must differ: another seed or loss starts elsewhere."""
    rows = {"image": torch.zeros(64, 1, 16, 16, dtype=torch.uint8),
            "label": torch.arange(64)}
    base = _cards("softmax", seed=0)["none"]
    other_seed = _cards("softmax", seed=1)["none"]
    w0 = initial_classifier(base).state_dict()
    w1 = initial_classifier(other_seed).state_dict()
    assert not all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not torch.equal(_first_id_batch(base, rows), _first_id_batch(other_seed, rows))
    assert pair_seed(base, "init") != pair_seed(_cards("arcface", seed=0)["none"], "init")
