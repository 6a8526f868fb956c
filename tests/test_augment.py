"""Classifier augmentation (train.augment): random crop with padding and horizontal flip, on
the batch's device, from a seed alone; refused where invalid (no flips for digits)."""

from __future__ import annotations

import pytest
import torch

from oodscale.classify.augment import Augment
from oodscale.config import AugmentConfig, ConfigError, load_config
from tests.support import DIGITS, FASHION


def _images(n: int = 6, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_disabled_augmentation_is_the_identity():
    x = _images()
    augment = Augment(AugmentConfig(), seed=0, device="cpu")
    assert not augment.active
    assert augment(x) is x and augment(None) is None


def test_crop_and_flip_keep_shapes_dtype_and_device():
    x = _images(5, channels=3, size=16)
    out = Augment(AugmentConfig(crop_padding=2, flip=True), seed=1, device="cpu")(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device


def test_the_same_seed_gives_the_same_augmentation_and_another_seed_another():
    x = _images(16)
    cfg = AugmentConfig(crop_padding=2, flip=True)
    first = Augment(cfg, seed=3, device="cpu")
    again = Augment(cfg, seed=3, device="cpu")
    assert torch.equal(first(x), again(x))
    assert torch.equal(first(x), again(x))  # and the second batch too
    assert not torch.equal(Augment(cfg, seed=4, device="cpu")(x), Augment(cfg, 3, "cpu")(x))


def test_flip_mirrors_some_images_and_leaves_the_others():
    x = _images(32)
    out = Augment(AugmentConfig(flip=True), seed=0, device="cpu")(x)
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 4 < sum(mirrored) < 28


def test_crop_shifts_each_image_by_at_most_the_padding():
    x = _images(12, size=10)
    p = 2
    out = Augment(AugmentConfig(crop_padding=p), seed=0, device="cpu")(x)
    padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
    shifts = set()
    for o, pad in zip(out, padded, strict=True):
        found = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 if torch.equal(o, pad[:, dy:dy + 10, dx:dx + 10])]
        assert found  # a window of the padded image
        shifts.add(found[0])
    assert len(shifts) > 1


def test_flips_are_refused_for_digits_and_allowed_where_mirrors_keep_the_class():
    digits = DIGITS
    assert not load_config(digits).train.augment.flip  # the demo: off
    assert load_config(digits, ["train.augment.crop_padding=2"]).train.augment.crop_padding == 2
    with pytest.raises(ConfigError, match="flip"):
        load_config(digits, ["train.augment.flip=true"])
    fashion = load_config(FASHION, ["train.augment.flip=true"])
    assert fashion.train.augment.flip


def test_the_training_step_augments_id_rows_and_outliers_alike(monkeypatch):
    from types import SimpleNamespace

    from oodscale.classify import step

    seen = []

    def fake_step(model, optimizer, accelerator, x, y, outliers, lambda_oe):
        seen.append((x, outliers))
        return torch.zeros(len(step.STEP_FIGURES))

    monkeypatch.setattr(step, "oe_step", fake_step)
    raw = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    batches = iter([{"image": raw, "label": torch.tensor([0, 1])}])
    drawn = torch.ones(3, 1, 4, 4)
    outliers = SimpleNamespace(next=lambda x, y: drawn)
    model = SimpleNamespace(train=lambda: None)
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    schedule = SimpleNamespace(step=lambda: None)
    step.train_epoch(model, None, accelerator, schedule, batches, outliers, 1, 0.5,
                     augment=lambda t: None if t is None else -t)
    (x, out), = seen
    assert torch.equal(x, -torch.ones(2, 1, 4, 4)) and torch.equal(out, -drawn)


def test_augmentation_keeps_a_device_batch_on_the_device():
    from tests.device_sim import SimulatedAccelerator

    with SimulatedAccelerator():
        x = _images(4).to("cpu")  # as a batch arrives on a GPU worker
        out = Augment(AugmentConfig(crop_padding=2, flip=True), seed=0, device="cpu")(x)
        torch.cat([out, x])  # raises if the augmentation made a host tensor of the batch
