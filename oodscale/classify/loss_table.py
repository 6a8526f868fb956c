"""The loss heads `train.losses` may name: one table the config validates against.

It imports nothing heavy; each row names its head builder in `oodscale.classify.losses`.
Adding a loss: its builder (and head class, if pytorch-metric-learning has none) and one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oodscale.errors import InputError


@dataclass(frozen=True)
class LossSpec:
    """One row: the head builder, the options a config may pass (anything else is a typo or
    would change what the head computes, e.g. its distance), and the scores that read the
    head's own output, where OE acts (the paper's protocol)."""

    build: str  # "module:function(embedding_dim, num_classes, options) -> ClassifierHead"
    options: tuple[str, ...] = ()
    head_scores: tuple[str, ...] = ("maxcos", "energy")


_HEADS = "oodscale.classify.losses"
LOSSES: dict[str, LossSpec] = {
    "softmax": LossSpec(f"{_HEADS}:softmax_head", (), ("msp",)),
    "arcface": LossSpec(f"{_HEADS}:arcface_head", ("margin", "scale")),
    "cosface": LossSpec(f"{_HEADS}:cosface_head", ("margin", "scale")),
    "sphereface": LossSpec(f"{_HEADS}:sphereface_head", ("margin", "scale")),
    "adacos": LossSpec(f"{_HEADS}:adacos_head"),
    "normsoftmax": LossSpec(f"{_HEADS}:normsoftmax_head", ("temperature",)),
}
LOSS_NAMES = tuple(LOSSES)  # the table's keys, in its order (tests parametrize over them)
# the plain loss: every cell is also compared with it without outliers (`vs_softmax`), and
# the ambiguity filter reads its classifier
BASELINE_LOSS = "softmax"


def check_loss_options(name: str, options: dict[str, Any] | None = None) -> None:
    """Refuse an unknown loss or an option its head does not take, listing the valid ones."""
    if name not in LOSSES:
        raise InputError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    allowed = LOSSES[name].options
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise InputError(f"unknown option(s) {unknown} for loss {name!r}; valid options: {valid}")
