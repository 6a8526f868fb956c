import numpy as np
import pytest
import torch

from oodscale.config import LambdaConfig
from oodscale.diffusion.mixup import distinct_pairs, mixup_labels, one_hot, sample_lambdas


def test_pairs_are_distinct_and_cover_all_classes():
    a, b = distinct_pairs(np.random.default_rng(0), 2000, 5)
    assert (a != b).all()
    assert set(a) == set(range(5)) and set(b) == set(range(5))


def test_mix_mode_puts_lambda_on_a_and_rest_on_b():
    a, b, lam = np.array([0, 3]), np.array([2, 1]), np.array([0.5, 0.8])
    y = mixup_labels(a, b, lam, 4, "mix")
    expected = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 0.2, 0.0, 0.8]])
    assert torch.allclose(y, expected)
    assert torch.allclose(y.sum(1), torch.ones(2))


def test_sum_mode_is_two_hot():
    y = mixup_labels(np.array([1]), np.array([2]), np.array([0.3]), 3, "sum")
    assert torch.equal(y, torch.tensor([[0.0, 1.0, 1.0]]))


def test_lambda_distributions():
    rng = np.random.default_rng(0)
    assert (sample_lambdas(rng, 5, LambdaConfig(kind="fixed", value=0.3)) == 0.3).all()
    u = sample_lambdas(rng, 1000, LambdaConfig(kind="uniform", low=0.2, high=0.4))
    assert u.min() >= 0.2 and u.max() <= 0.4
    beta = sample_lambdas(rng, 4000, LambdaConfig(kind="beta", alpha=2.0))
    assert 0.45 < beta.mean() < 0.55 and 0 < beta.min() and beta.max() < 1


def test_one_hot_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        one_hot(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError):
        mixup_labels(np.array([0]), np.array([1]), np.array([0.5]), 2, "avg")
