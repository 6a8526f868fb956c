"""Outlier sources for the OE term that need no stored shards: noise and pixel-space mixup.

`labelmix` outliers come from the generate stage's shards; the sources here are the cheap
alternatives a sceptical reviewer asks about, drawn on the fly from the ID batch's shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NOISE_KINDS = ("gaussian", "uniform", "blobs")


def noise_outliers(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A batch in [-1, 1] cycling Gaussian, uniform and blob noise, one kind per row."""
    n = shape[0]
    gauss = (torch.randn(shape, generator=generator) * 0.5).clamp(-1, 1)
    unif = torch.rand(shape, generator=generator) * 2 - 1
    raw = (torch.rand(shape, generator=generator) < 0.7).float()
    smooth = F.avg_pool2d(raw, kernel_size=3, stride=1, padding=1)
    blobs = (smooth > 0.75).float() * 2 - 1
    kind = torch.arange(n) % len(NOISE_KINDS)
    pick = kind.view(-1, *([1] * (len(shape) - 1)))
    return torch.where(pick == 0, gauss, torch.where(pick == 1, unif, blobs))


def pixelmix_outliers(images: torch.Tensor, labels: torch.Tensor, count: int,
                      generator: torch.Generator, lam: float = 0.5) -> torch.Tensor:
    """`count` pixel-space mixes λ·x_a + (1−λ)·x_b of ID images of different classes."""
    n = len(labels)
    a = torch.randint(0, n, (count,), generator=generator)
    b = torch.randint(0, n, (count,), generator=generator)
    if labels.unique().numel() < 2:
        raise ValueError("pixelmix needs ID batches holding at least two classes")
    same = labels[a] == labels[b]
    # Re-pair same-class rows with a partner of another class from the batch.
    for i in same.nonzero().flatten().tolist():
        others = (labels != labels[a[i]]).nonzero().flatten()
        b[i] = others[torch.randint(0, len(others), (1,), generator=generator)]
    return lam * images[a] + (1 - lam) * images[b]
