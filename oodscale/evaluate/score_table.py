"""The scores `evaluate.scores` may name: the built-in ones and pytorch-ood's detectors
(`pood:<Name>`), one table each, which the config validates against.

It imports nothing heavy: built-in rows name their function in `oodscale.evaluate.detectors`,
pytorch-ood rows the detector class that `oodscale.evaluate.pood` builds. Adding a score: its
function and one row here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Literal

from oodscale.errors import InputError


@dataclass(frozen=True)
class ScoreSpec:
    """One built-in score: its function, whether it fits on the ID training split, and what of
    the network it reads (the report says so beside every table)."""

    compute: str  # "module:function(ScoreInputs) -> Tensor", higher = more ID
    fit: bool
    reads: str
    fit_normed: bool = False  # also needs the Gaussian of the unit-normalised embeddings


_SCORES = "oodscale.evaluate.detectors"
SCORES: dict[str, ScoreSpec] = {
    "msp": ScoreSpec(f"{_SCORES}:msp_score", False, "softmax probabilities"),
    "maxlogit": ScoreSpec(f"{_SCORES}:maxlogit_score", False, "logits"),
    "energy": ScoreSpec(f"{_SCORES}:energy_score", False, "logits"),
    "maxcos": ScoreSpec(f"{_SCORES}:maxcos_score", False, "cosines to the class weights"),
    "knn": ScoreSpec(f"{_SCORES}:knn_score", True, "the normalised embedding"),
    "mahalanobis": ScoreSpec(f"{_SCORES}:mahalanobis_score", True, "the raw embedding"),
    "mahalanobis_normed": ScoreSpec(f"{_SCORES}:mahalanobis_normed_score", True,
                                    "the normalised embedding", fit_normed=True),
}
SCORE_NAMES = tuple(SCORES)  # the built-in names, in the table's order

POOD_PREFIX = "pood:"
INSTALL_HINT = "pip install 'oodscale[pood]'"

# What a detector reads:
#   logits             the head's logits (predict_logits / fit_logits)
#   embeddings         the backbone's output, the head's input (predict_features / fit_features)
#   embeddings+head    the same, plus the head as the detector's `head` callable
#   linear             features f and a linear layer (W, b) with logits = f W^T + b, found by
#                      probing the head (`linear_view`): ViM and DICE need that layer
#   pooled+head        pooled penultimate activations as B x F x 1 x 1 maps, plus the rest of
#                      the network (embedding layer and head) as `head`: activation shaping
Reads = Literal["logits", "embeddings", "embeddings+head", "linear", "pooled+head"]


@dataclass(frozen=True)
class PoodSpec:
    reads: Reads
    fit: bool  # fitted on the ID training split before scoring
    options: dict[str, Any] = field(default_factory=dict)  # constructor keywords


# The pytorch-ood detectors `evaluate.scores` may name as `pood:<Name>` (the class names in
# `pytorch_ood.detector`). Adding one: a row here, with what it reads.
POOD_DETECTORS: dict[str, PoodSpec] = {
    "MaxSoftmax": PoodSpec("logits", False),
    "EnergyBased": PoodSpec("logits", False),
    "MaxLogit": PoodSpec("logits", False),
    "Entropy": PoodSpec("logits", False),
    "GEN": PoodSpec("logits", False),
    "KLMatching": PoodSpec("logits", True),
    "KNN": PoodSpec("embeddings", True),
    "Mahalanobis": PoodSpec("embeddings", True),
    "RMD": PoodSpec("embeddings", True),
    "NNGuide": PoodSpec("embeddings+head", True),
    "SHE": PoodSpec("embeddings+head", True),
    "ViM": PoodSpec("linear", True),
    "DICE": PoodSpec("linear", True, {"p": 0.9}),  # sparsity of the DICE paper's CIFAR runs
    "ReAct": PoodSpec("pooled+head", True),
    "ASH": PoodSpec("pooled+head", False),
    "SCALE": PoodSpec("pooled+head", False),
}
POOD_SCORE_NAMES = tuple(POOD_PREFIX + name for name in POOD_DETECTORS)


def pood_spec(score_name: str) -> PoodSpec:
    """The table row of `pood:<Name>`; a clear error for a name pytorch-ood (or the table) lacks,
    or when pytorch-ood is not installed."""
    name = score_name.removeprefix(POOD_PREFIX)
    if name not in POOD_DETECTORS:
        raise InputError(f"unknown pytorch-ood detector {score_name!r}; valid names: "
                         f"{', '.join(POOD_SCORE_NAMES)}")
    if importlib.util.find_spec("pytorch_ood") is None:
        raise InputError(f"score {score_name!r} needs pytorch-ood, which is not installed: "
                         f"{INSTALL_HINT}")
    return POOD_DETECTORS[name]


def check_score_name(name: str) -> str:
    """`name` if it is a built-in score or a known `pood:<Name>`; else a ValueError that lists
    every valid name (and, for a pood name without pytorch-ood, how to install it)."""
    if name in SCORES:
        return name
    if name.startswith(POOD_PREFIX):
        pood_spec(name)
        return name
    raise InputError(f"unknown score {name!r}; valid names: {', '.join(SCORE_NAMES)}, "
                     f"{', '.join(POOD_SCORE_NAMES)}")


def needs_fit(name: str) -> bool:
    """Whether the score learns from the ID training split before scoring."""
    return SCORES[name].fit if name in SCORES else pood_spec(name).fit
