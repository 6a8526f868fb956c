"""Every sampler clips what it predicts to the pixel range, as DDIM does, so swapping the
sampler changes how many steps a sample takes, not what range it lands in."""

import pytest
import torch

from oodscale.diffusion.samplers import SAMPLERS, make_sampler


def final_sample(scheduler, eps: float) -> torch.Tensor:
    """Denoise pure noise with a constant noise prediction that pushes x0 far outside [-1, 1]."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.full_like(x, eps), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_pixel_space_samples_stay_in_range(kind: str) -> None:
    sample = final_sample(make_sampler(kind, 1000, 20), eps=-3.0)
    assert sample.abs().max() <= 1.0 + 1e-4


def test_latent_space_dpmsolver_is_left_unclipped() -> None:
    """A latent generator (DiT: clip_sample False) keeps its latents unclipped with DPM-Solver++
    as with DDIM: the VAE decodes values beyond [-1, 1]."""
    scheduler = make_sampler("dpmsolver", 1000, 20, clip_sample=False)
    assert not scheduler.config.thresholding
    assert final_sample(scheduler, eps=-3.0).abs().max() > 1.5
    assert make_sampler("dpmsolver", 1000, 20).config.thresholding
