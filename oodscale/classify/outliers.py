"""The outlier rows of each OE step, for every outlier source, on the step's device.

`labelmix` outliers come from the generate stage's shards (streamed like the ID batches); noise
and pixel-space mixup are the cheap alternatives a sceptical reviewer asks about, drawn on the
fly from the ID batch's shape with a generator on the same device, so no step waits on the host.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from oodscale.data.streams import to_model_input
from oodscale.devices import device_generator

NOISE_KINDS = ("gaussian", "uniform", "blobs")


def noise_outliers(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A batch in [-1, 1] cycling Gaussian, uniform and blob noise, one kind per row, drawn on
    the generator's device."""
    n, device = shape[0], generator.device
    gauss = (torch.randn(shape, generator=generator, device=device) * 0.5).clamp(-1, 1)
    unif = torch.rand(shape, generator=generator, device=device) * 2 - 1
    raw = (torch.rand(shape, generator=generator, device=device) < 0.7).float()
    smooth = F.avg_pool2d(raw, kernel_size=3, stride=1, padding=1)
    blobs = (smooth > 0.75).float() * 2 - 1
    kind = torch.arange(n, device=device) % len(NOISE_KINDS)
    pick = kind.view(-1, *([1] * (len(shape) - 1)))
    return torch.where(pick == 0, gauss, torch.where(pick == 1, unif, blobs))


def pixelmix_outliers(images: torch.Tensor, labels: torch.Tensor, count: int,
                      generator: torch.Generator, lam: float = 0.5) -> torch.Tensor:
    """`count` pixel-space mixes λ·x_a + (1−λ)·x_b of ID images of different classes.

    Partners are drawn uniformly among the batch's rows of another class, without a host sync;
    a batch holding a single class (possible only with tiny batches) mixes within it.
    """
    n, device = len(labels), generator.device
    a = torch.randint(0, n, (count,), generator=generator, device=device)
    other_class = (labels[None, :] != labels[a][:, None]).float()  # count × n
    # Uniform scores in [0, 1) plus 1 for other-class rows: argmax is uniform among those.
    b = (torch.rand(count, n, generator=generator, device=device) + other_class).argmax(1)
    return lam * images[a] + (1 - lam) * images[b]


class OutlierStream:
    """The outlier rows for one grid cell's source: `next(x_id, y_id)` gives a batch or None."""

    def __init__(self, source: str, count: int, num_classes: int, seed: int,
                 device: torch.device | str,
                 synthetic: Iterator[dict[str, torch.Tensor]] | None = None) -> None:
        if source.startswith("labelmix") and synthetic is None:
            raise ValueError(f"outlier source {source!r} needs the synthetic shards' batches")
        if source == "pixelmix" and num_classes < 2:
            raise ValueError("pixelmix mixes images of two classes; the ID data has one")
        if source not in ("none", "noise", "pixelmix") and not source.startswith("labelmix"):
            raise ValueError(f"unknown outlier source {source!r}; valid: none, labelmix, "
                             "noise, pixelmix")
        self.source, self.count, self.synthetic = source, count, synthetic
        self.generator = device_generator(seed, device)

    def next(self, x_id: torch.Tensor, y_id: torch.Tensor) -> torch.Tensor | None:
        if self.source == "none":
            return None
        if self.source == "noise":
            return noise_outliers((self.count, *x_id.shape[1:]), self.generator)
        if self.source == "pixelmix":
            return pixelmix_outliers(x_id, y_id, self.count, self.generator)
        return to_model_input(next(self.synthetic)["image"])
