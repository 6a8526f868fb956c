"""Classifier augmentation (`train.augment`): random crop with padding and horizontal flip, on
the device inside the training step, for ID images and outliers alike.

Every draw comes from a torch.Generator on the batch's device seeded per (cell, rank, epoch),
so a cell is reproducible and a resumed cell augments its remaining epochs as an uninterrupted
one would. Images are model input (float in [-1, 1], B×C×H×W); padding reflects the border so
no constant (whose value would mean "black" in one dataset and "grey" in another) is invented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oodscale.config import AugmentConfig


class Augment:
    """Random crop (`crop_padding` pixels each side, then back to H×W) and flip (p = 1/2)."""

    def __init__(self, cfg: AugmentConfig, seed: int, device: torch.device | str) -> None:
        self.padding, self.flip = cfg.crop_padding, cfg.flip
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def active(self) -> bool:
        return self.padding > 0 or self.flip

    def __call__(self, images: torch.Tensor | None) -> torch.Tensor | None:
        if images is None or not self.active:
            return images
        if self.padding:
            images = self._crop(images)
        if self.flip:
            flip = torch.rand(len(images), device=images.device,
                              generator=self.generator) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return images

    def _crop(self, images: torch.Tensor) -> torch.Tensor:
        """Each image shifted by its own offset in [-padding, padding]² (reflected border)."""
        b, _, h, w = images.shape
        p = self.padding
        padded = F.pad(images, (p, p, p, p), mode="reflect" if p < min(h, w) else "replicate")
        dy, dx = (torch.randint(0, 2 * p + 1, (b,), device=images.device,
                                generator=self.generator) for _ in range(2))
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # B×H×1
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # B×1×W
        batch = torch.arange(b, device=images.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
