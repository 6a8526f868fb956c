"""Outlier sources: one table of every source the training grid may name.

A source family knows how its names are spelled, whether it needs a generator (and so the
train-diffusion/generate stages), and which function makes the outlier rows of one OE step
(in `oodscale.outliers`, imported on use: this module is light, so validating a config is).
Generator sources live in directories named by their own settings, never relative to the
config's current default: `labelmix` (guidance = generate.guidance, say 3) reads
`<run>/synthetic-w3`, `labelmix-w1-filtered` reads `<run>/synthetic-w1-filtered`.
Adding a source: its function and one row of `SOURCES`.

Any source but `none` may end in `-ft` (`labelmix-ft`): the cell then fine-tunes the finished
`none` cell of its loss and seed with OE for `train.finetune_epochs` (the OE paper's schedule)
instead of training from scratch; it reads the same shards as the source without `-ft`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from oodscale.errors import InputError


@dataclass(frozen=True)
class SourceFamily:
    """One row of the table: the names it accepts, its needs, and its batch maker."""

    pattern: str  # a full-match regex; a generator family captures `w` (guidance), `filtered`
    syntax: str  # how the names are spelled, for error messages
    needs_generator: bool
    batch: str  # "module:function(stream, x_id, y_id)" in oodscale.outliers
    min_classes: int = 1


_ROWS = "oodscale.outliers"
# a label-mixup name: its guidance `w` and the filter flag, for every family drawn from shards
LABELMIX = r"labelmix(?:-w(?P<w>\d+(?:\.\d+)?))?(?P<filtered>-filtered)?"
SOURCES: dict[str, SourceFamily] = {
    "none": SourceFamily(r"none", "none", False, f"{_ROWS}:no_outliers"),
    "noise": SourceFamily(r"noise", "noise", False, f"{_ROWS}:noise_rows"),
    "pixelmix": SourceFamily(r"pixelmix", "pixelmix", False, f"{_ROWS}:pixelmix_rows",
                             min_classes=2),
    "labelmix": SourceFamily(
        LABELMIX, "labelmix[-w<guidance>][-filtered] (e.g. labelmix-w1-filtered)", True,
        f"{_ROWS}:labelmix_rows"),
    "labelmix+noise": SourceFamily(
        LABELMIX + r"\+noise", "labelmix[-w<guidance>][-filtered]+noise (half each)", True,
        f"{_ROWS}:labelmix_noise_rows"),
    "labelmix+pixelmix": SourceFamily(
        LABELMIX + r"\+pixelmix", "labelmix[-w<guidance>][-filtered]+pixelmix (half each)",
        True, f"{_ROWS}:labelmix_pixelmix_rows", min_classes=2),
}


NO_OUTLIERS = "none"  # the cells that OE's effect is measured against (`vs_none`)


@dataclass(frozen=True)
class OutlierSource:
    """A parsed source name; generator sources carry their guidance and filter flag."""

    family: str
    guidance: float | None = None
    filtered: bool = False
    finetune: bool = False

    @property
    def needs_generator(self) -> bool:
        return SOURCES[self.family].needs_generator

    @property
    def dirname(self) -> str:
        """The run directory of a generator source's shards, named by its own settings."""
        if self.guidance is None:
            raise InputError(f"outlier source {self.family!r} has no shards of its own")
        return synthetic_dirname(self.guidance) + ("-filtered" if self.filtered else "")

    @property
    def unfiltered(self) -> OutlierSource:
        return OutlierSource(self.family, self.guidance, False, self.finetune)


def synthetic_dirname(guidance: float) -> str:
    """`synthetic-w3` for shards drawn at guidance 3 (`synthetic-w1.5` at 1.5)."""
    return f"synthetic-w{guidance:g}"


FINETUNE = "-ft"  # the suffix of a source whose cell fine-tunes its `none` cell


def parse_source(name: str, default_guidance: float) -> OutlierSource:
    """The source a name asks for; a generator source without `-w<g>` uses the default."""
    finetune = name.endswith(FINETUNE) and name != "none" + FINETUNE
    base = name.removesuffix(FINETUNE) if finetune else name
    for family, spec in SOURCES.items():
        match = re.fullmatch(spec.pattern, base)
        if match is None:
            continue
        if not spec.needs_generator:
            return OutlierSource(family, finetune=finetune)
        w = match.groupdict().get("w")
        return OutlierSource(family, float(w) if w else default_guidance,
                             bool(match.groupdict().get("filtered")), finetune)
    valid = ", ".join(spec.syntax for spec in SOURCES.values())
    raise InputError(f"unknown outlier source {name!r}; valid: {valid}; any but none may end "
                     f"in {FINETUNE} (OE fine-tuning of the finished none cell)")


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
