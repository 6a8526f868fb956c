"""Post-hoc OOD scores computed from a classifier's logits and embeddings.

Sign conventions:

* OpenOOD (what this module returns and what ``scores.parquet`` stores in ``score``):
  higher = more in-distribution. The metrics in :mod:`oodscale.evaluate.metrics` expect it.
* pytorch-ood: higher = more OOD. Convert with ``pytorch_ood_score = -score``.

``knn`` and ``mahalanobis`` need statistics of the ID training embeddings, gathered once by
:func:`fit_features`. Both work in chunks so ImageNet-sized feature banks fit in memory.
pytorch-ood's detectors join as ``pood:<Name>`` (:mod:`oodscale.evaluate.pood`); `ScoreSet`
computes built-in and pytorch-ood scores alike from one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from oodscale.classify.models import Activations, OODClassifier
from oodscale.evaluate.pood import PoodScore
from oodscale.evaluate.score_table import SCORE_NAMES, SCORES, needs_fit
from oodscale.lazy import load


@dataclass(frozen=True)
class ScoreInputs:
    """What a built-in score may read from one batch."""

    logits: torch.Tensor  # float64
    embeddings: torch.Tensor
    class_weights: torch.Tensor | None
    fitted: FittedFeatures | None
    temperature: float
    chunk: int


@dataclass
class FittedFeatures:
    """ID training statistics: L2-normalised bank for kNN, class means + tied precision."""

    train_normed: torch.Tensor  # N x D, unit rows
    class_means: torch.Tensor  # C x D, float64, one row per class present in training
    precision: torch.Tensor  # D x D, float64, pseudo-inverse of the tied covariance
    k: int
    # the same Gaussian fitted on the unit-normalised embeddings (`mahalanobis_normed`)
    normed_means: torch.Tensor | None = None
    normed_precision: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> FittedFeatures:
        """The same statistics on `device` (the fit task returns them on the CPU)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return FittedFeatures(self.train_normed.to(device), self.class_means.to(device),
                              self.precision.to(device), self.k, move(self.normed_means),
                              move(self.normed_precision))


def fit_features(
    embeddings: torch.Tensor, labels: torch.Tensor, k: int = 10, chunk: int = 4096,
    normed: bool = False,
) -> FittedFeatures:
    """Fit kNN/Mahalanobis statistics with per-chunk accumulation (memory bounded by ``chunk``),
    on the embeddings' device; with ``normed`` the Gaussian of the unit-normalised embeddings
    too.

    Only classes that occur in ``labels`` get a mean, so non-contiguous label sets are fine.
    """
    emb = embeddings.detach().float()
    lab = labels.detach().long().ravel().to(emb.device)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty N x D tensor, got {tuple(emb.shape)}")
    if lab.shape[0] != emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} embeddings but {lab.shape[0]} labels")
    if not 1 <= k <= emb.shape[0]:
        raise ValueError(f"k must be in [1, {emb.shape[0]}] (number of training rows), got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")

    _, cls = torch.unique(lab, return_inverse=True)
    means, precision = _tied_gaussian(emb, cls, chunk)
    unit = F.normalize(emb, dim=1)
    normed_means, normed_precision = _tied_gaussian(unit, cls, chunk) if normed else (None, None)
    return FittedFeatures(unit, means, precision, k, normed_means, normed_precision)


def _tied_gaussian(emb: torch.Tensor, cls: torch.Tensor, chunk: int,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and the pseudo-inverse of the shared covariance, in float64."""
    n_cls, dim = int(cls.max()) + 1, emb.shape[1]
    sums = torch.zeros(n_cls, dim, dtype=torch.float64, device=emb.device)
    counts = torch.zeros(n_cls, dtype=torch.float64, device=emb.device)
    for i in range(0, emb.shape[0], chunk):
        x, c = emb[i : i + chunk].double(), cls[i : i + chunk]
        sums.index_add_(0, c, x)
        counts.index_add_(0, c, torch.ones_like(c, dtype=torch.float64))
    means = sums / counts[:, None]

    # Second pass: centring on the class mean before the outer product keeps float64 accurate.
    scatter = torch.zeros(dim, dim, dtype=torch.float64, device=emb.device)
    for i in range(0, emb.shape[0], chunk):
        centred = emb[i : i + chunk].double() - means[cls[i : i + chunk]]
        scatter += centred.T @ centred
    cov = scatter / emb.shape[0]
    return means, torch.linalg.pinv(cov, hermitian=True)


def _knn_score(emb: torch.Tensor, fitted: FittedFeatures, chunk: int) -> torch.Tensor:
    """Negative distance to the k-th nearest training point on the unit sphere.

    Both test and train sides are chunked; a running top-k of similarities is merged per
    train chunk, so at most ``chunk x (chunk + k)`` similarities exist at once.
    """
    bank = fitted.train_normed.to(emb.device)
    query = F.normalize(emb.float(), dim=1)
    out = torch.empty(query.shape[0], dtype=torch.float32, device=emb.device)
    for i in range(0, query.shape[0], chunk):
        q = query[i : i + chunk]
        best = torch.empty(q.shape[0], 0, device=emb.device)
        for j in range(0, bank.shape[0], chunk):
            sims = torch.cat([best, q @ bank[j : j + chunk].T], dim=1)
            best = sims.topk(min(fitted.k, sims.shape[1]), dim=1).values
        kth_sim = best[:, fitted.k - 1]
        out[i : i + chunk] = -torch.sqrt(torch.clamp(2.0 - 2.0 * kth_sim, min=0.0))
    return out


def _mahalanobis_score(emb: torch.Tensor, means: torch.Tensor, prec: torch.Tensor,
                       chunk: int) -> torch.Tensor:
    """Negative minimum squared Mahalanobis distance to a class mean (tied covariance)."""
    means, prec = means.to(emb.device), prec.to(emb.device)
    mean_term = ((means @ prec) * means).sum(dim=1)  # m^T P m, per class
    out = torch.empty(emb.shape[0], dtype=torch.float64, device=emb.device)
    for i in range(0, emb.shape[0], chunk):
        x = emb[i : i + chunk].double()
        xp = x @ prec
        dist = (xp * x).sum(dim=1, keepdim=True) - 2.0 * xp @ means.T + mean_term[None, :]
        out[i : i + chunk] = -dist.min(dim=1).values
    return out


def _maxcos_score(emb: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """Largest cosine between the embedding and any class weight (metric heads' natural score)."""
    if class_weights is None:
        raise ValueError("score 'maxcos' needs class_weights (C x D), got None")
    if class_weights.ndim != 2 or class_weights.shape[1] != emb.shape[1]:
        raise ValueError(
            f"class_weights must be C x D with D={emb.shape[1]}, got {tuple(class_weights.shape)}"
            " (pytorch-metric-learning stores W as D x C: pass W.T)"
        )
    w = F.normalize(class_weights.detach().to(emb.device).float(), dim=1)
    return (F.normalize(emb.float(), dim=1) @ w.T).max(dim=1).values


def mahalanobis_normed_score(x: ScoreInputs) -> torch.Tensor:
    if x.fitted.normed_means is None:
        raise ValueError("score 'mahalanobis_normed' needs features fitted with normed=True")
    return _mahalanobis_score(F.normalize(x.embeddings.float(), dim=1), x.fitted.normed_means,
                              x.fitted.normed_precision, x.chunk)


# The functions `score_table.SCORES` names, one per built-in score.
def msp_score(x: ScoreInputs) -> torch.Tensor:
    return torch.softmax(x.logits / x.temperature, dim=1).max(dim=1).values


def maxlogit_score(x: ScoreInputs) -> torch.Tensor:
    return x.logits.max(dim=1).values


def energy_score(x: ScoreInputs) -> torch.Tensor:
    return x.temperature * torch.logsumexp(x.logits / x.temperature, dim=1)


def maxcos_score(x: ScoreInputs) -> torch.Tensor:
    return _maxcos_score(x.embeddings, x.class_weights)


def knn_score(x: ScoreInputs) -> torch.Tensor:
    return _knn_score(x.embeddings, x.fitted, x.chunk)


def mahalanobis_score(x: ScoreInputs) -> torch.Tensor:
    return _mahalanobis_score(x.embeddings, x.fitted.class_means, x.fitted.precision, x.chunk)


def compute_scores(
    names: Sequence[str],
    logits: torch.Tensor,
    embeddings: torch.Tensor,
    class_weights: torch.Tensor | None,
    fitted: FittedFeatures | None,
    temperature: float = 1.0,
    *,
    chunk: int = 1024,
) -> dict[str, np.ndarray]:
    """Compute each named score (higher = more ID) for every row of ``logits``/``embeddings``."""
    unknown = [n for n in names if n not in SCORES]
    if unknown:
        raise ValueError(f"unknown score name(s) {unknown}; valid names: {list(SCORE_NAMES)} "
                         "(pytorch-ood's `pood:` scores go through ScoreSet)")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if logits.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows but {embeddings.shape[0]} embedding rows")
    needing = [n for n in names if SCORES[n].fit]
    if fitted is None and needing:
        raise ValueError(f"score(s) {needing} need fitted features (fit_features)")

    with torch.no_grad():
        inputs = ScoreInputs(logits.detach().double(), embeddings.detach(), class_weights,
                             fitted, temperature, chunk)
        result = {name: load(SCORES[name].compute)(inputs) for name in names}
    return {name: s.cpu().numpy().astype(np.float64) for name, s in result.items()}


@dataclass
class TrainFit:
    """What the scores of one classifier learned from the ID training split, fitted once (a Ray
    task) and shared by every scoring actor: kNN/Mahalanobis statistics and fitted pytorch-ood
    detectors, the latter without their model callables until `ScoreSet` binds them."""

    features: FittedFeatures | None
    pood: dict[str, PoodScore]

    def to(self, device: torch.device | str) -> TrainFit:
        return TrainFit(self.features.to(device) if self.features is not None else None,
                        {name: p.to(device) for name, p in self.pood.items()})


def fit_train(names: Sequence[str], model: OODClassifier, train: Activations,
              labels: torch.Tensor) -> TrainFit:
    """Fit every score of `names` that learns from the ID training split, on its activations."""
    features = None
    if any(n in SCORES and SCORES[n].fit for n in names):
        features = fit_features(train.embeddings, labels.to(train.embeddings.device),
                                normed=any(SCORES[n].fit_normed for n in names if n in SCORES))
    pood = {n: PoodScore(n, model, train, labels).unbind()
            for n in names if n not in SCORES and needs_fit(n)}
    return TrainFit(features, pood)


class ScoreSet:
    """Every named score of one classifier, computed from one batch of its activations."""

    def __init__(self, names: Sequence[str], model: OODClassifier, fitted: TrainFit | None):
        missing = [n for n in names if needs_fit(n) and (
            fitted is None or (n in SCORES and fitted.features is None)
            or (n not in SCORES and n not in fitted.pood))]
        if missing:
            raise ValueError(f"score(s) {missing} learn from the ID training split, but no fit "
                             "was given (fit_train)")
        self.builtin = [n for n in names if n in SCORES]
        self.features = fitted.features if fitted is not None else None
        self.class_weights = model.head.class_weights.detach().float()
        self.pood = {n: fitted.pood[n].bind(model) if needs_fit(n) else PoodScore(n, model)
                     for n in names if n not in SCORES}
        self.names = list(names)

    def __call__(self, acts: Activations) -> dict[str, np.ndarray]:
        out = compute_scores(self.builtin, acts.logits, acts.embeddings, self.class_weights,
                             self.features)
        out.update({n: p(acts).cpu().numpy() for n, p in self.pood.items()})
        return {n: out[n] for n in self.names}
