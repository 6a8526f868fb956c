"""Test sets as large as the data: every held-out test image by default, a cap only where a
config sets one, crops from every image the packages ship, sizes and sources on record."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from oodscale.config import load_config
from oodscale.data import builtin
from oodscale.data.builtin import digits_source_splits
from oodscale.data.fashion_mnist import fashion_source_splits
from tests.support import CONFIG, FASHION

SPLITS = {"digits": digits_source_splits, "fashion_mnist": fashion_source_splits}


def _openset(cfg, purpose: str) -> np.ndarray:
    _, _, held, held_val = SPLITS[cfg.data.source](cfg)
    pool = held if purpose == "ood" else held_val
    return builtin.builtin_ood("openset", cfg.data.ood_set_size("openset", purpose),
                               cfg.data.image_size, cfg.data.channels, cfg.seed, pool, purpose,
                               cfg.data.val_set_size)


def test_the_digits_open_set_takes_every_held_out_digit_but_the_validation_share():
    cfg = load_config(CONFIG)
    held_out = int(np.isin(load_digits().target, [6, 7, 8, 9]).sum())
    test, val = _openset(cfg, "ood"), _openset(cfg, "ood-val")
    assert len(val) == round(cfg.data.val_fraction * held_out)
    assert len(test) + len(val) == held_out  # nothing left unused
    flat = {im.tobytes() for im in test}
    assert not any(im.tobytes() in flat for im in val)  # never a test image twice
    capped = _openset(load_config(CONFIG, ["data.ood_samples=50"]), "ood")
    assert len(capped) == 50


def test_fashion_near_ood_is_every_held_out_test_image():
    cfg = load_config(FASHION)
    assert cfg.data.ood_samples is None and cfg.data.max_test_per_class is None
    assert len(_openset(cfg, "ood")) == 4000  # shirt, sneaker, bag, ankle boot: 1,000 each
    assert len(_openset(cfg, "ood-val")) == cfg.data.val_ood_samples


def test_crops_use_every_shipped_source_and_say_so():
    rng = np.random.default_rng(0)
    for name, sources in builtin.CROP_SOURCES.items():
        images = builtin.crops(sources, 2 * len(sources), 16, 1, rng)
        assert images.shape == (2 * len(sources), 16, 16, 1)
        assert builtin.source_count(name, 1000) == f"{len(sources)} shipped images"
    assert len(builtin.TEXTURES) >= 10 and len(builtin.PHOTOS) >= 12
    assert builtin.source_count("gaussian", 1000) == "generated"
    assert builtin.source_count("openset", 4000) == "4000 images"
    cfg = load_config(CONFIG)
    assert cfg.data.ood_set_size("textures", "ood") == cfg.data.generated_ood_samples
    assert load_config(CONFIG, ["data.ood_samples=40"]).data.ood_set_size("photos", "ood") == 40


def test_a_generated_set_needs_a_count():
    with pytest.raises(ValueError, match="generated"):
        builtin.builtin_ood("gaussian", None, 16, 1, 0, None)
