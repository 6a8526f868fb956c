"""Classifier heads (softmax and metric-learning losses) and the outlier-exposure term.

Every head exposes the same three things the training loop and the detectors need: margin-free
logits for every row (OE and the logit-based scores use them), the ID loss for labelled rows, and
the class weight matrix (for the cosine score).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from torch import Tensor, nn

from oodscale.classify.loss_table import LOSSES, check_loss_options
from oodscale.errors import InputError
from oodscale.lazy import load


class ClassifierHead(nn.Module, abc.ABC):
    """Embeddings to class logits; one interface for every loss keeps training loss-agnostic."""

    @abc.abstractmethod
    def logits(self, embeddings: Tensor) -> Tensor:
        """(B, C) logits without any margin: what OE and the logit scores see at test time."""

    @abc.abstractmethod
    def id_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar training loss of the head on labelled (ID) rows."""

    @property
    @abc.abstractmethod
    def class_weights(self) -> Tensor:
        """(C, D) class weight vectors, unnormalised; the cosine score normalises them."""


class SoftmaxHead(ClassifierHead):
    """Plain linear classifier trained with cross-entropy: the baseline every metric head beats."""

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embedding_dim, num_classes)

    def logits(self, embeddings: Tensor) -> Tensor:
        return self.linear(embeddings)

    def id_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(embeddings), labels)

    @property
    def class_weights(self) -> Tensor:
        return self.linear.weight


class MetricLossHead(ClassifierHead):
    """Wraps a pytorch-metric-learning classification loss, which owns the class weights W (D×C).

    The loss object applies its margin only inside its forward; `get_logits` gives the scaled
    cosines without margin from the same weights, which is what OE and scoring must use.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def _cast(self, embeddings: Tensor) -> Tensor:
        # pml casts W.data to the embeddings' dtype in place; feeding W's own dtype keeps a
        # mixed-precision forward from silently turning the weights into half precision.
        return embeddings.to(self.loss.W.dtype)

    def logits(self, embeddings: Tensor) -> Tensor:
        return self.loss.get_logits(self._cast(embeddings))

    def id_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(self._cast(embeddings), labels)

    @property
    def class_weights(self) -> Tensor:
        return self.loss.W.t()


class AdaCosHead(ClassifierHead):
    """AdaCos (Zhang et al., 2019): cosine logits with a scale set from the batch, not tuned.

    The scale is a buffer, not a parameter: it is set without gradient from each training batch,
    saved with the weights and broadcast by DistributedDataParallel like BatchNorm statistics.
    """

    scale: Tensor

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 3:
            # The initial scale sqrt(2)·log(C−1) is 0 for C = 2 and the update keeps it there.
            raise InputError(f"adacos needs at least 3 classes, got {num_classes}")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.register_buffer("scale", torch.tensor(math.sqrt(2.0) * math.log(num_classes - 1)))

    def cosine(self, embeddings: Tensor) -> Tensor:
        """(B, C) cosines between embeddings and class weights."""
        return F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).t()

    def _scaled(self, cosine: Tensor) -> Tensor:
        # A copy of the scale enters the graph, so a later in-place update (next training batch,
        # DDP buffer broadcast) cannot invalidate tensors saved for backward.
        return self.scale.clone() * cosine

    def logits(self, embeddings: Tensor) -> Tensor:
        return self._scaled(self.cosine(embeddings))

    def id_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cosine = self.cosine(embeddings)
        if self.training:
            self.update_scale(cosine.detach(), labels)
        return F.cross_entropy(self._scaled(cosine), labels)

    @torch.no_grad()
    def update_scale(self, cosine: Tensor, labels: Tensor) -> None:
        """s ← log(B_avg) / cos(min(π/4, θ_med)), the paper's dynamic scale, from one batch."""
        target = F.one_hot(labels, cosine.shape[1]).bool()
        non_target = (self.scale * cosine).masked_fill(target, float("-inf"))
        # B_avg = mean over rows of Σ_{k≠y} exp(s·cos θ_k); its log via logsumexp cannot overflow.
        log_b_avg = torch.logsumexp(non_target.flatten(), dim=0) - math.log(cosine.shape[0])
        # gather, not a boolean mask: a mask index waits for the GPU to count its rows.
        theta = torch.acos(cosine.gather(1, labels[:, None]).squeeze(1).clamp(-1.0, 1.0))
        theta_med = torch.clamp(theta.median(), max=math.pi / 4)
        self.scale.copy_(log_b_avg / torch.cos(theta_med))

    @property
    def class_weights(self) -> Tensor:
        return self.weight


def _pml(loss_cls: type[nn.Module]) -> Callable[[int, int, dict[str, Any]], ClassifierHead]:
    return lambda dim, classes, options: MetricLossHead(
        loss_cls(num_classes=classes, embedding_size=dim, **options))


# The head builders `loss_table.LOSSES` names, one per loss.
def softmax_head(dim: int, classes: int, _: dict[str, Any]) -> ClassifierHead:
    return SoftmaxHead(dim, classes)


def adacos_head(dim: int, classes: int, _: dict[str, Any]) -> ClassifierHead:
    return AdaCosHead(dim, classes)


arcface_head = _pml(pml_losses.ArcFaceLoss)
cosface_head = _pml(pml_losses.CosFaceLoss)
sphereface_head = _pml(pml_losses.SphereFaceLoss)
normsoftmax_head = _pml(pml_losses.NormalizedSoftmaxLoss)


def build_head(
    name: str, embedding_dim: int, num_classes: int, options: dict[str, Any] | None = None
) -> ClassifierHead:
    """Head for a loss name; `options` go to the pml constructor (margin, scale, temperature)."""
    check_loss_options(name, options)
    return load(LOSSES[name].build)(embedding_dim, num_classes, dict(options or {}))


def kl_to_uniform(logits: Tensor) -> Tensor:
    """Outlier-exposure term: batch mean of KL(U ‖ softmax(logits)) = −log C − mean_k log p_k.

    It is 0 exactly when the prediction is uniform, so it pushes outliers to maximal doubt.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    num_classes = logits.shape[1]
    log_probs = F.log_softmax(logits, dim=1)
    return (-math.log(num_classes) - log_probs.mean(dim=1)).mean()
