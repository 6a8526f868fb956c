"""Outlier sources: one table of every source the training grid may name.

A source family knows how its names are spelled, whether it needs a generator (and so the
train-diffusion/generate stages), and how it makes the outlier rows of one OE step. Generator
sources live in directories named by their own settings, never relative to the config's current
default: `labelmix` (guidance = generate.guidance, say 3) reads `<run>/synthetic-w3`,
`labelmix-w1-filtered` reads `<run>/synthetic-w1-filtered`.

Noise and pixel-space mixup are the cheap alternatives a sceptical reviewer asks about, drawn on
the fly from the ID batch's shape with a generator on the same device, so no step waits on the
host. Adding a source: one function and one row of `SOURCES`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
        self.source = parse_source(source, default_guidance=0.0)
        self.family = SOURCES[self.source.family]
        if self.family.needs_generator and synthetic is None:
            raise ValueError(f"outlier source {source!r} needs the synthetic shards' batches")
        if num_classes < self.family.min_classes:
            raise ValueError(f"{self.source.family} mixes images of {self.family.min_classes} "
                             f"different classes; the ID data has {num_classes}")
        self.count, self.synthetic = count, synthetic
        self.generator = device_generator(seed, device)

    def next(self, x_id: torch.Tensor, y_id: torch.Tensor) -> torch.Tensor | None:
        return self.family.batch(self, x_id, y_id)


Batch = Callable[[OutlierStream, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def labelmix_batch(stream: OutlierStream) -> torch.Tensor:
    """The next batch of the stream's synthetic shards, as model input."""
    return to_model_input(next(stream.synthetic)["image"])


def half_labelmix(stream: OutlierStream, rest: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Half label-mixup rows, the other half `rest(n)` from a source drawn on the fly: blends
    alone teach the network to doubt blends, not everything unlike the ID data (far-OOD got
    worse with them on Fashion-MNIST)."""
    half = stream.count // 2
    return torch.cat([labelmix_batch(stream)[:half], rest(stream.count - half)])


@dataclass(frozen=True)
class SourceFamily:
    """One row of the table: the names it accepts, its needs, and its batch maker."""

    pattern: str  # a full-match regex; a generator family captures `w` (guidance), `filtered`
    syntax: str  # how the names are spelled, for error messages
    needs_generator: bool
    batch: Batch
    min_classes: int = 1


# a label-mixup name: its guidance `w` and the filter flag, for every family drawn from shards
LABELMIX = r"labelmix(?:-w(?P<w>\d+(?:\.\d+)?))?(?P<filtered>-filtered)?"
SOURCES: dict[str, SourceFamily] = {
    "none": SourceFamily(r"none", "none", False, lambda s, x, y: None),
    "noise": SourceFamily(r"noise", "noise", False,
                          lambda s, x, y: noise_outliers((s.count, *x.shape[1:]), s.generator)),
    "pixelmix": SourceFamily(r"pixelmix", "pixelmix", False,
                             lambda s, x, y: pixelmix_outliers(x, y, s.count, s.generator),
                             min_classes=2),
    "labelmix": SourceFamily(
        LABELMIX, "labelmix[-w<guidance>][-filtered] (e.g. labelmix-w1-filtered)", True,
        lambda s, x, y: labelmix_batch(s)),
    "labelmix+noise": SourceFamily(
        LABELMIX + r"\+noise", "labelmix[-w<guidance>][-filtered]+noise (half each)", True,
        lambda s, x, y: half_labelmix(
            s, lambda n: noise_outliers((n, *x.shape[1:]), s.generator))),
    "labelmix+pixelmix": SourceFamily(
        LABELMIX + r"\+pixelmix", "labelmix[-w<guidance>][-filtered]+pixelmix (half each)",
        True,
        lambda s, x, y: half_labelmix(s, lambda n: pixelmix_outliers(x, y, n, s.generator)),
        min_classes=2),
}


@dataclass(frozen=True)
class OutlierSource:
    """A parsed source name; generator sources carry their guidance and filter flag."""

    family: str
    guidance: float | None = None
    filtered: bool = False

    @property
    def needs_generator(self) -> bool:
        return SOURCES[self.family].needs_generator

    @property
    def dirname(self) -> str:
        """The run directory of a generator source's shards, named by its own settings."""
        if self.guidance is None:
            raise ValueError(f"outlier source {self.family!r} has no shards of its own")
        return synthetic_dirname(self.guidance) + ("-filtered" if self.filtered else "")

    @property
    def unfiltered(self) -> OutlierSource:
        return OutlierSource(self.family, self.guidance, False)


def synthetic_dirname(guidance: float) -> str:
    """`synthetic-w3` for shards drawn at guidance 3 (`synthetic-w1.5` at 1.5)."""
    return f"synthetic-w{guidance:g}"


def parse_source(name: str, default_guidance: float) -> OutlierSource:
    """The source a name asks for; a generator source without `-w<g>` uses the default."""
    for family, spec in SOURCES.items():
        match = re.fullmatch(spec.pattern, name)
        if match is None:
            continue
        if not spec.needs_generator:
            return OutlierSource(family)
        w = match.groupdict().get("w")
        return OutlierSource(family, float(w) if w else default_guidance,
                             bool(match.groupdict().get("filtered")))
    valid = ", ".join(spec.syntax for spec in SOURCES.values())
    raise ValueError(f"unknown outlier source {name!r}; valid: {valid}")


def check_source_name(name: str) -> str:
    """Validate an outlier source name (the config's validator); the error lists the forms."""
    parse_source(name, default_guidance=0.0)
    return name


def generator_sources(names: list[str], default_guidance: float) -> list[OutlierSource]:
    """One generator source per shard directory among `names` (`labelmix` and
    `labelmix+noise` read the same shards), the default guidance's first."""
    parsed = (parse_source(n, default_guidance) for n in names)
    found = sorted((s for s in parsed if s.needs_generator),
                   key=lambda s: (s.guidance != default_guidance, s.guidance, s.filtered,
                                  s.family))
    unique: dict[str, OutlierSource] = {}
    for source in found:
        unique.setdefault(source.dirname, source)
    return list(unique.values())
