"""The DDPM recipe: an EMA of the weights (diffusers' EMAModel), an lr warm-up and schedule
(diffusers' get_scheduler), the EMA weights published, and a checkpoint that restores all of it.
Tiny UNets, a few steps, no Ray."""

from __future__ import annotations

import torch

from oodscale.config import DiffusionConfig
from oodscale.diffusion.model import LabelConditionedUNet
from oodscale.diffusion.train import (
    EMA_STATE,
    SAMPLING_DIR,
    load_training_state,
    make_ema,
    make_lr_schedule,
    restore_weights,
    sampling_weights,
    save_training_state,
)

RECIPE = DiffusionConfig(block_out_channels=[8, 8], lr=1e-2, lr_warmup_steps=2,
                         ema_decay=0.99)


def _unet(seed: int = 0) -> LabelConditionedUNet:
    torch.manual_seed(seed)
    return LabelConditionedUNet(num_classes=3, sample_size=8, in_channels=1,
                                block_out_channels=(8, 8))


def _trained(d: DiffusionConfig, steps: int, total: int = 10):
    """A tiny UNet after `steps` optimiser steps, with its optimiser, lr schedule and EMA."""
    model = _unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=d.lr, weight_decay=0.0)
    schedule = make_lr_schedule(optimizer, d, total)
    ema = make_ema(model, d)
    _steps(model, optimizer, schedule, ema, steps)
    return model, optimizer, schedule, ema


def _steps(model, optimizer, schedule, ema, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 1, 8, 8, generator=generator)
        y = torch.eye(3)[torch.randint(0, 3, (4,), generator=generator)]
        loss = model(x, torch.full((4,), 10), y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.step(model.parameters())


def test_lr_warms_up_from_zero_then_follows_the_cosine_down():
    model = _unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = make_lr_schedule(optimizer, DiffusionConfig(lr=1e-3, lr_warmup_steps=4), 20)
    lrs = []
    for _ in range(20):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[0] == 0.0 and abs(lrs[4] - 1e-3) < 1e-12  # linear warm-up to the peak
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # then down
    assert lrs[-1] < 1e-4


def test_ema_warms_up_and_is_capped_at_the_configured_decay():
    ema = make_ema(_unet(), DiffusionConfig(ema_decay=0.999, ema_warmup_power=0.75))
    assert ema.get_decay(2) < 0.5  # the first steps barely average
    assert abs(ema.get_decay(1001) - (1 - 1001 ** -0.75)) < 1e-12
    assert ema.get_decay(10**7) == 0.999
    assert make_ema(_unet(), DiffusionConfig(ema_decay=0.0)) is None


def test_samples_come_from_the_ema_weights_not_the_raw_ones():
    model, _, _, ema = _trained(RECIPE, 5)
    averaged = sampling_weights(model, ema)
    for mine, shadow in zip(averaged.parameters(), ema.shadow_params, strict=True):
        assert torch.equal(mine, shadow)
    assert any(not torch.equal(a, r) for a, r in zip(averaged.parameters(), model.parameters(),
                                                      strict=True))
    no_ema = DiffusionConfig(ema_decay=0.0)
    plain, _, _, none = _trained(no_ema, 2)
    assert sampling_weights(plain, none) is plain


def test_a_checkpoint_restores_ema_and_lr_schedule_and_training_continues_identically(tmp_path):
    model, optimizer, schedule, ema = _trained(RECIPE, 3)
    save_training_state(tmp_path, model, ema, optimizer, schedule)
    assert (tmp_path / SAMPLING_DIR / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / EMA_STATE).is_file()
    # a fresh process: raw weights from the checkpoint, fresh optimiser, schedule and EMA
    restored = _unet(seed=1)  # another initialisation, overwritten by the checkpoint's
    restore_weights(tmp_path, restored)
    optimizer2 = torch.optim.AdamW(restored.parameters(), lr=RECIPE.lr, weight_decay=0.0)
    schedule2 = make_lr_schedule(optimizer2, RECIPE, 10)
    ema2 = make_ema(restored, RECIPE)
    load_training_state(tmp_path, restored, ema2, optimizer2, schedule2)
    assert ema2.optimization_step == ema.optimization_step == 3
    assert schedule2.last_epoch == schedule.last_epoch == 3
    for a, b in zip(ema2.shadow_params, ema.shadow_params, strict=True):
        assert torch.equal(a, b)
    assert "_name_or_path" not in restored.config  # nothing of the checkpoint's path is saved
    _steps(model, optimizer, schedule, ema, 3, seed=7)
    _steps(restored, optimizer2, schedule2, ema2, 3, seed=7)
    assert schedule2.get_last_lr() == schedule.get_last_lr()
    for a, b in zip(ema2.shadow_params, ema.shadow_params, strict=True):
        assert torch.equal(a, b)  # the resumed EMA equals the uninterrupted one


def test_without_ema_the_checkpoint_publishes_the_raw_weights(tmp_path):
    no_ema = DiffusionConfig(ema_decay=0.0)
    model, optimizer, schedule, ema = _trained(no_ema, 2)
    save_training_state(tmp_path, model, ema, optimizer, schedule)
    assert not (tmp_path / EMA_STATE).exists()
    published = LabelConditionedUNet.from_pretrained(tmp_path / SAMPLING_DIR)
    for a, b in zip(published.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
