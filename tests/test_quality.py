"""Sample-quality figures of a generator (oodscale/diffusion/quality.py) on tiny data: the
Fréchet distance, the label-mixup "betweenness", a reference classifier and the samples drawn
for them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodscale.config import GenerateConfig
from oodscale.diffusion.model import LabelConditionedUNet, UNetGenerator
from oodscale.diffusion.quality import (
    draw_quality_samples,
    entropy,
    frechet_distance,
    mixup_betweenness,
    sample_quality,
    train_reference,
)

CLASSES = 3


def _squares(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8×8 gray images: class k is a bright 4×4 square in corner k, on noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), per_class)
    images = rng.integers(0, 60, (len(labels), 1, 8, 8)).astype(np.uint8)
    corners = [(0, 0), (0, 4), (4, 0)]
    for i, k in enumerate(labels):
        r, c = corners[k]
        images[i, 0, r:r + 4, c:c + 4] = 230
    return images, labels


def test_frechet_distance_is_zero_on_one_set_and_the_squared_mean_shift_on_a_shifted_one():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5])
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    wider = frechet_distance(a, 3 * a)  # same mean, 3x the spread: Tr((1 - 3)² Σ) ≈ 4·3
    assert wider == pytest.approx(12.0, rel=0.2)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], a)


def test_betweenness_of_clean_and_even_blends():
    a, b = np.array([0, 1]), np.array([1, 2])
    clean = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # a clean a, then a clean b
    figures = mixup_betweenness(clean, a, b)
    assert figures["mix_pair_mass"] == pytest.approx(1.0)
    assert figures["mix_weaker_share"] == pytest.approx(0.0)
    assert figures["mix_entropy"] == pytest.approx(0.0, abs=1e-9)
    even = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    figures = mixup_betweenness(even, a, b)
    assert figures["mix_mass_a"] == figures["mix_mass_b"] == pytest.approx(0.5)
    assert figures["mix_weaker_share"] == pytest.approx(0.5)
    assert figures["mix_entropy"] == pytest.approx(math.log(2))
    assert figures["mix_entropy_ratio"] == pytest.approx(math.log(2) / math.log(3))
    assert entropy(np.full((1, 4), 0.25))[0] == pytest.approx(math.log(4))


def test_reference_classifier_reads_real_images_and_mislabelled_ones_as_such():
    train, train_labels = _squares(40, seed=0)
    test, test_labels = _squares(10, seed=1)
    reference = train_reference(train, train_labels, CLASSES, epochs=8, batch_size=16,
                                seed=0)
    figures = sample_quality(reference, test, test_labels, test, test_labels, test,
                             test_labels, (test_labels + 1) % CLASSES)
    assert figures["reference_test_accuracy"] == 100.0
    assert figures["conditional_accuracy"] == figures["reference_test_accuracy"]
    assert figures["frechet_distance"] == pytest.approx(0.0, abs=1e-4)  # the same images
    assert figures["mix_mass_a"] > 0.9 and figures["mix_mass_b"] < 0.1  # clean class-a images
    wrong = sample_quality(reference, test, test_labels, test, (test_labels + 1) % CLASSES)
    assert wrong["conditional_accuracy"] == 0.0 and "mix_pair_mass" not in wrong
    noise = np.random.default_rng(2).integers(0, 255, test.shape).astype(np.uint8)
    far = sample_quality(reference, test, test_labels, noise, test_labels)
    assert far["frechet_distance"] > 1.0


def test_quality_samples_are_drawn_per_class_and_as_label_mixup():
    torch.manual_seed(0)
    unet = LabelConditionedUNet(num_classes=CLASSES, sample_size=8, in_channels=1,
                                block_out_channels=(8, 8)).eval()
    gen = GenerateConfig(steps=2, batch_size=4, guidance=2.0, mode="composed")
    drawn = draw_quality_samples(UNetGenerator(unet, 50), gen, list(range(CLASSES)), 2, seed=0)
    assert drawn["class_images"].shape == (6, 1, 8, 8)
    assert drawn["class_images"].dtype == np.uint8
    assert list(drawn["class_labels"]) == [0, 0, 1, 1, 2, 2]
    assert drawn["mix_images"].shape == (6, 1, 8, 8)
    assert (drawn["mix_a"] != drawn["mix_b"]).all()


def test_a_stored_ddpm_is_measured_for_its_card(tmp_path):
    from oodscale.config import build_config
    from oodscale.data.shards import Manifest, write_split
    from oodscale.diffusion.quality import measure_stored_ddpm
    from oodscale.runtime import RunLayout, open_storage

    cfg = build_config({"name": "q", "storage": {"root": str(tmp_path)},
                        "diffusion": {"quality_per_class": 2},
                        "generate": {"steps": 2, "batch_size": 8, "mode": "composed"}})
    storage = open_storage(str(tmp_path))
    layout = RunLayout(storage, cfg.name)
    for split, seed in (("train", 0), ("test", 1)):
        images, labels = _squares(6, seed)
        manifest = Manifest(kind="id", split=split, image_size=8, channels=1,
                            class_names=[str(k) for k in range(CLASSES)])
        write_split(storage, layout.id_split(split), split, images.transpose(0, 2, 3, 1),
                    [{"label": int(k)} for k in labels], 100, manifest)
    torch.manual_seed(0)
    unet = LabelConditionedUNet(num_classes=CLASSES, sample_size=8, in_channels=1,
                                block_out_channels=(8, 8))
    unet.save_pretrained(tmp_path / "q" / "diffusion" / "unet", safe_serialization=True)
    card = {"generator": "ddpm", "num_classes": CLASSES, "timesteps": 50}
    figures = measure_stored_ddpm(storage.uri, cfg.model_dump(), card, use_gpu=False)
    assert figures["class_samples"] == figures["mix_samples"] == 2 * CLASSES
    assert figures["test_images"] == 6 * CLASSES
    assert figures["sampling"]["mode"] == "composed" and figures["frechet_distance"] >= 0
    for key in ("conditional_accuracy", "reference_test_accuracy", "mix_pair_mass",
                "mix_entropy", "mix_weaker_share"):
        assert isinstance(figures[key], float), key
