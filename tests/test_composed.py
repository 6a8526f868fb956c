"""Composed label-mixup guidance (generate.mode=composed, Liu et al. 2022):
ε = ε_u + w·[λ(ε_a − ε_u) + (1 − λ)(ε_b − ε_u)], for the project's UNet and a pretrained DiT."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from oodscale.config import GenerateConfig
from oodscale.diffusion.mixup import mixup_conditions, one_hot
from oodscale.diffusion.model import LabelConditionedUNet, UNetGenerator
from oodscale.diffusion.sample import sample_images, scheduler_for
from tests.dit_models import tiny_dit

CLASSES = 3


def _unet() -> UNetGenerator:
    torch.manual_seed(0)
    unet = LabelConditionedUNet(num_classes=CLASSES, sample_size=8, in_channels=1,
                                block_out_channels=(16, 16)).eval()  # 2 channels a group:
    # with GroupNorm's 8 groups over 8 channels the time-and-label embedding (a per-channel
    # offset) would be normalised away and the labels would not move the output
    return UNetGenerator(unet, timesteps=100)


def _dit():
    return tiny_dit(classes=CLASSES)


GENERATORS = {"unet": _unet, "dit": _dit}


class _Recording:
    """A one-step scheduler that keeps the noise prediction it is given and leaves x as is."""

    def __init__(self, t: int) -> None:
        self.timesteps, self.eps = torch.tensor([t]), None

    def step(self, eps, t, x, generator=None):
        self.eps = eps
        return SimpleNamespace(prev_sample=x)


def test_composed_conditions_are_the_two_one_hots_weighted_lambda_and_its_complement():
    labels, weights = mixup_conditions(np.array([0, 2]), np.array([1, 0]),
                                       np.array([0.7, 0.25]), CLASSES, "composed")
    assert labels.shape == (2, 2, CLASSES) and weights.shape == (2, 2)
    assert torch.equal(labels[:, 0], one_hot(torch.tensor([0, 2]), CLASSES))
    assert torch.equal(labels[:, 1], one_hot(torch.tensor([1, 0]), CLASSES))
    assert torch.allclose(weights, torch.tensor([[0.7, 0.3], [0.25, 0.75]]))
    mixed, unit = mixup_conditions(np.array([0]), np.array([1]), np.array([0.7]), CLASSES)
    assert mixed.shape == (1, 1, CLASSES) and torch.equal(unit, torch.ones(1, 1))


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_composed_lambda_one_reproduces_class_a_guided_output_exactly(kind):
    model = GENERATORS[kind]()
    gen = GenerateConfig(sampler="ddim", steps=3, mode="composed", guidance=3.0)
    a, b = np.array([0, 1, 2, 0]), np.array([1, 2, 0, 2])
    labels, weights = mixup_conditions(a, b, np.ones(4), CLASSES, "composed")
    composed = sample_images(model, labels, gen.guidance, scheduler_for(model, gen),
                             torch.Generator().manual_seed(5), weights=weights)
    guided = sample_images(model, one_hot(torch.as_tensor(a), CLASSES), gen.guidance,
                           scheduler_for(model, gen), torch.Generator().manual_seed(5))
    assert torch.equal(composed, guided)


@pytest.mark.parametrize("kind", sorted(GENERATORS))
@torch.no_grad()
def test_composed_mixed_lambda_is_the_composable_diffusion_formula(kind):
    model, w, t = GENERATORS[kind](), 2.5, 40
    a, b, lam = np.array([0, 2]), np.array([1, 0]), np.array([0.3, 0.6])
    labels, weights = mixup_conditions(a, b, lam, CLASSES, "composed")
    scheduler = _Recording(t)
    sample_images(model, labels, w, scheduler, torch.Generator().manual_seed(3), weights=weights)
    x = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(3))
    tt = torch.full((2,), t)

    def eps(y: torch.Tensor) -> torch.Tensor:
        return model.predict_noise(x, tt, y).float()

    eps_u = model.predict_noise(x, tt, model.null_condition(2)).float()
    eps_a = eps(model.condition(one_hot(torch.as_tensor(a), CLASSES)))
    eps_b = eps(model.condition(one_hot(torch.as_tensor(b), CLASSES)))
    lam_t = torch.as_tensor(lam, dtype=torch.float32).view(-1, 1, 1, 1)
    expected = eps_u + w * (lam_t * (eps_a - eps_u) + (1 - lam_t) * (eps_b - eps_u))
    assert torch.allclose(scheduler.eps, expected, atol=1e-5)
    # and it is not the label-mixup guidance of the mixed label
    mixed = eps(model.condition(lam_t.view(-1, 1) * one_hot(torch.as_tensor(a), CLASSES)
                                + (1 - lam_t.view(-1, 1)) * one_hot(torch.as_tensor(b),
                                                                    CLASSES)))
    assert not torch.allclose(scheduler.eps, eps_u + w * (mixed - eps_u), atol=1e-3)


def test_composed_is_a_valid_generate_mode():
    assert GenerateConfig(mode="composed").mode == "composed"
    with pytest.raises(ValueError):
        GenerateConfig(mode="average")
