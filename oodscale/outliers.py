"""The outlier rows of one OE step, for each source of `outlier_sources.SOURCES`.

Noise and pixel-space mixup are the cheap alternatives a sceptical reviewer asks about, drawn on
the fly from the ID batch's shape with a generator on the same device, so no step waits on the
host; label-mixup rows come from the synthetic shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from oodscale.data.streams import to_model_input
from oodscale.devices import device_generator
from oodscale.errors import InputError
from oodscale.lazy import load
from oodscale.outlier_sources import SOURCES, parse_source

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
        self.source = parse_source(source, default_guidance=0.0)
        self.family = SOURCES[self.source.family]
        self.batch = load(self.family.batch)
        if self.family.needs_generator and synthetic is None:
            raise InputError(f"outlier source {source!r} needs the synthetic shards' batches")
        if num_classes < self.family.min_classes:
            raise InputError(f"{self.source.family} mixes images of {self.family.min_classes} "
                             f"different classes; the ID data has {num_classes}")
        self.count, self.synthetic = count, synthetic
        self.generator = device_generator(seed, device)

    def next(self, x_id: torch.Tensor, y_id: torch.Tensor) -> torch.Tensor | None:
        return self.batch(self, x_id, y_id)


def labelmix_batch(stream: OutlierStream) -> torch.Tensor:
    """The next batch of the stream's synthetic shards, as model input."""
    return to_model_input(next(stream.synthetic)["image"])


def half_labelmix(stream: OutlierStream, rest: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Half label-mixup rows, the other half `rest(n)` from a source drawn on the fly: blends
    alone teach the network to doubt blends, not everything unlike the ID data (far-OOD got
    worse with them on Fashion-MNIST)."""
    half = stream.count // 2
    return torch.cat([labelmix_batch(stream)[:half], rest(stream.count - half)])


# The batch makers `outlier_sources.SOURCES` names: (stream, ID images, ID labels) → the
# step's outlier rows, or None for no OE term.
def no_outliers(stream: OutlierStream, x: torch.Tensor, y: torch.Tensor) -> None:
    return None


def noise_rows(stream: OutlierStream, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return noise_outliers((stream.count, *x.shape[1:]), stream.generator)


def pixelmix_rows(stream: OutlierStream, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return pixelmix_outliers(x, y, stream.count, stream.generator)


def labelmix_rows(stream: OutlierStream, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return labelmix_batch(stream)


def labelmix_noise_rows(stream: OutlierStream, x: torch.Tensor, y: torch.Tensor,
                        ) -> torch.Tensor:
    return half_labelmix(stream, lambda n: noise_outliers((n, *x.shape[1:]), stream.generator))


def labelmix_pixelmix_rows(stream: OutlierStream, x: torch.Tensor, y: torch.Tensor,
                           ) -> torch.Tensor:
    return half_labelmix(stream, lambda n: pixelmix_outliers(x, y, n, stream.generator))
