"""Names of outlier sources, and where each label-mixup variant's shards live.

`labelmix` uses the generate config as is; `labelmix-w1` draws with guidance 1 instead (its own
generation run); a `-filtered` suffix keeps only the samples a plain ID classifier is unsure of.
The default variant lives in `<run>/synthetic`, others in `<run>/synthetic-w<g>[-filtered]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PLAIN_SOURCES = ("none", "noise", "pixelmix")
_LABELMIX = re.compile(r"^labelmix(?:-w(?P<w>\d+(?:\.\d+)?))?(?P<filtered>-filtered)?$")


@dataclass(frozen=True)
class LabelmixVariant:
    guidance: float
    filtered: bool

    def dirname(self, default_guidance: float) -> str:
        base = "synthetic" if self.guidance == default_guidance else f"synthetic-w{self.guidance:g}"
        return f"{base}-filtered" if self.filtered else base

    @property
    def unfiltered(self) -> LabelmixVariant:
        return LabelmixVariant(self.guidance, False)


def check_source_name(name: str) -> str:
    """Validate an outlier source name; the error lists the valid forms."""
    if name in PLAIN_SOURCES or _LABELMIX.match(name):
        return name
    raise ValueError(f"unknown outlier source {name!r}; valid: none, noise, pixelmix, labelmix, "
                     f"labelmix-w<guidance> (e.g. labelmix-w1), and either with -filtered")


def labelmix_variant(name: str, default_guidance: float) -> LabelmixVariant | None:
    """The label-mixup variant a source name asks for, or None for the other sources."""
    match = _LABELMIX.match(name)
    if match is None:
        return None
    w = float(match["w"]) if match["w"] else default_guidance
    return LabelmixVariant(guidance=w, filtered=bool(match["filtered"]))
