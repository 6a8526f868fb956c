"""Paired cells: two cells of one seed and loss differ only by their outlier source."""

from __future__ import annotations

import torch

from oodscale.classify.train import RunSpec, _card, initial_classifier, pair_seed
from oodscale.config import load_config
from oodscale.data.shards import Manifest
from oodscale.data.streams import reshuffled_batches
from tests.support import CONFIG

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


def test_paired_cells_augment_their_id_rows_alike(monkeypatch):
    """With train.augment on, the ID rows' crops and flips come from the pair's stream: a cell
    that draws outliers augments its ID rows exactly as the cell without outliers does."""
    from types import SimpleNamespace

    from oodscale.classify import step
    from oodscale.classify.augment import Augment
    from oodscale.config import AugmentConfig
    from oodscale.runtime import derive_seed

    none, labelmix = _cards("arcface", seed=0).values()
    settings = AugmentConfig(crop_padding=2, flip=True)
    images = torch.randint(0, 256, (4, 8, 1, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    seen: dict[str, list[torch.Tensor]] = {"none": [], "labelmix": []}

    cells = (("none", none, None), ("labelmix", labelmix, torch.ones(8, 1, 16, 16)))
    for name, card, drawn in cells:
        monkeypatch.setattr(step, "oe_step", lambda model, opt, acc, x, y, out, lam, name=name:
                            seen[name].append(x) or torch.zeros(len(step.STEP_FIGURES)))
        batches = iter([{"image": im, "label": torch.arange(8)} for im in images])
        step.train_epoch(SimpleNamespace(train=lambda: None), None,
                         SimpleNamespace(device=torch.device("cpu")),
                         SimpleNamespace(step=lambda: None), batches,
                         SimpleNamespace(next=lambda x, y, drawn=drawn: drawn), 4, 0.5,
                         Augment(settings, pair_seed(card, "augment", 0, 0), "cpu"),
                         Augment(settings, derive_seed(card["run"], "augment-outliers"), "cpu"))
    assert all(torch.equal(a, b) for a, b in zip(seen["none"], seen["labelmix"], strict=True))
