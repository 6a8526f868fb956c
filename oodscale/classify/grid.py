"""The training grid: its cells (loss × outlier source × seed), light so `status` reads it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from oodscale.config import ExperimentConfig


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: loss × outlier source × seed."""

    loss: str
    outliers: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.loss}-{self.outliers}-s{self.seed}"


def grid(cfg: ExperimentConfig) -> list[RunSpec]:
    t = cfg.train
    return [RunSpec(loss, out, seed)
            for (loss, out), seed in itertools.product(t.cells, t.seeds)]
