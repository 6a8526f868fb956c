"""Outlier sources: names, label-mixup variants, noise and pixel-space mixup."""

import numpy as np
import pytest
import torch

from oodscale.config import ConfigError, load_config
from oodscale.diffusion.mixup import distinct_pairs
from oodscale.outlier_sources import (
    OutlierSource,
    check_source_name,
    generator_sources,
    parse_source,
)
from oodscale.outliers import OutlierStream, noise_outliers, pixelmix_outliers
from tests.support import DIGITS


def test_source_names_map_to_absolute_directories():
    assert parse_source("labelmix", 3.0) == OutlierSource("labelmix", 3.0, False)
    assert parse_source("labelmix", 3.0).dirname == "synthetic-w3"
    assert parse_source("labelmix-w1", 3.0).dirname == "synthetic-w1"
    assert parse_source("labelmix-filtered", 3.0).dirname == "synthetic-w3-filtered"
    assert parse_source("labelmix-w1.5-filtered", 3.0).dirname == "synthetic-w1.5-filtered"
    # the same shards whether named by the default or explicitly: one directory, not two
    assert parse_source("labelmix-w3", 3.0) == parse_source("labelmix", 3.0)
    # a directory name does not move when the default guidance changes
    assert parse_source("labelmix-w1", 5.0).dirname == "synthetic-w1"
    noise = parse_source("noise", 3.0)
    assert not noise.needs_generator and parse_source("labelmix", 3.0).needs_generator
    with pytest.raises(ValueError, match="no shards"):
        _ = noise.dirname


def test_generator_sources_are_distinct_with_the_default_first():
    found = generator_sources(["none", "labelmix-w1", "labelmix", "labelmix-w3-filtered",
                               "labelmix-w3", "noise"], 3.0)
    assert [s.dirname for s in found] == ["synthetic-w3", "synthetic-w3-filtered",
                                          "synthetic-w1"]


def test_a_finetune_suffix_reads_the_same_shards_and_needs_its_none_cell():
    tuned = parse_source("labelmix-w1-ft", 3.0)
    assert tuned.finetune and tuned.dirname == "synthetic-w1" and tuned.guidance == 1.0
    assert parse_source("noise-ft", 3.0) == OutlierSource("noise", finetune=True)
    assert not parse_source("labelmix", 3.0).finetune
    with pytest.raises(ValueError, match="unknown outlier source 'none-ft'"):
        parse_source("none-ft", 3.0)
    cfg = load_config(DIGITS, ["train.outliers=[none,labelmix-ft]"])
    assert ("softmax", "labelmix-ft") in cfg.train.cells
    with pytest.raises(ConfigError, match="add none to train.outliers"):
        load_config(DIGITS, ["train.outliers=[labelmix,labelmix-ft]"])


def test_unknown_source_is_a_config_error_listing_valid_ones():
    with pytest.raises(ValueError, match="pixelmix"):
        check_source_name("labelmx")
    with pytest.raises(ConfigError, match="train.outliers"):
        load_config(DIGITS, ["train.outliers=[none,gan]"])


def test_noise_outliers_shape_range_and_kinds():
    x = noise_outliers((9, 1, 16, 16), torch.Generator().manual_seed(0))
    assert x.shape == (9, 1, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    blobs = x[2::3]
    assert set(blobs.unique().tolist()) <= {-1.0, 1.0}  # blobs are binary
    assert x[1::3].unique().numel() > 100  # uniform noise is continuous


def test_pixelmix_mixes_images_of_different_classes():
    images = torch.stack([torch.full((1, 4, 4), float(v)) for v in (-1.0, 1.0, -1.0, 1.0)])
    labels = torch.tensor([0, 1, 0, 1])
    out = pixelmix_outliers(images, labels, 50, torch.Generator().manual_seed(0))
    assert out.shape == (50, 1, 4, 4)
    assert torch.allclose(out, torch.zeros_like(out))  # always one -1 and one +1 image
    # A batch of one class mixes within it rather than stalling the step on a host check.
    same = pixelmix_outliers(images[::2], labels[::2], 4, torch.Generator().manual_seed(0))
    assert torch.allclose(same, torch.full_like(same, -1.0))


def test_pixelmix_partners_are_uniform_over_other_class_rows():
    images = torch.eye(6).view(6, 6, 1, 1)  # row i is the basis image e_i: mixes decode
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    out = pixelmix_outliers(images, labels, 6000, torch.Generator().manual_seed(0))
    picked = (out.view(6000, 6) > 0).nonzero()[:, 1].view(6000, 2)  # the two rows mixed
    assert (labels[picked[:, 0]] != labels[picked[:, 1]]).all()
    pair_counts = torch.zeros(6, 6)
    pair_counts.index_put_((picked[:, 0], picked[:, 1]), torch.ones(6000), accumulate=True)
    counts = pair_counts[pair_counts > 0]
    assert counts.numel() == 12  # every cross-class pair of rows occurs...
    assert counts.min() > 0.6 * counts.mean()  # ...about equally often


def test_pixelmix_source_refuses_one_class_data():
    with pytest.raises(ValueError, match="2 different classes"):
        OutlierStream("pixelmix", 4, 1, 0, "cpu")


def test_labelmix_pairs_have_provenance_fields_in_range():
    a, b = distinct_pairs(np.random.default_rng(1), 100, 6)
    assert ((0 <= a) & (a < 6) & (0 <= b) & (b < 6) & (a != b)).all()


def test_labelmix_plus_noise_reads_the_labelmix_shards_and_adds_noise():
    both = parse_source("labelmix-w1+noise", 3.0)
    assert both.needs_generator and both.dirname == "synthetic-w1"
    # one shard directory however many sources read it
    assert [s.dirname for s in generator_sources(["labelmix+noise", "labelmix", "noise"], 3.0)
            ] == ["synthetic-w3"]
    synthetic = iter([{"image": torch.full((8, 1, 16, 16), 255, dtype=torch.uint8)}])
    stream = OutlierStream("labelmix+noise", 8, 6, 0, "cpu", synthetic)
    rows = stream.next(torch.zeros(4, 1, 16, 16), torch.arange(4))
    assert rows.shape == (8, 1, 16, 16)
    assert (rows[:4] == 1.0).all()  # the synthetic rows, as model input
    assert (rows[4:] != 1.0).any() and rows[4:].min() >= -1 and rows[4:].max() <= 1


def test_labelmix_plus_pixelmix_mixes_the_batch_for_its_second_half():
    synthetic = iter([{"image": torch.full((6, 1, 4, 4), 255, dtype=torch.uint8)}])
    stream = OutlierStream("labelmix+pixelmix", 6, 2, 0, "cpu", synthetic)
    x, y = torch.stack([torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), 0.5)]), torch.arange(2)
    rows = stream.next(x, y)
    assert (rows[:3] == 1.0).all() and torch.allclose(rows[3:], torch.full((3, 1, 4, 4), -0.25))
    assert parse_source("labelmix+pixelmix", 3.0).dirname == "synthetic-w3"
