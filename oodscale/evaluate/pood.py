"""pytorch-ood detectors as evaluate scores: `pood:<Name>` in `evaluate.scores`.

Every detector reads one of the classifier's own activations (`OODClassifier.activations`:
logits, embeddings, pooled penultimate activations), computed by the classifier's backbone and
head in the one forward pass the built-in scores use, so there is no copy of the network and no
second forward. pytorch-ood's sign is higher = more OOD; every value leaving this module is
negated to this project's sign (higher = more ID).

The table below holds names only, so validating a config never imports pytorch-ood (or the
torchvision it pulls in); the detector classes are looked up when a score is built.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pickle
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from oodscale.classify.models import Activations, OODClassifier
from oodscale.errors import InputError
from oodscale.evaluate.score_table import INSTALL_HINT, POOD_PREFIX, pood_spec

log = logging.getLogger(__name__)

def _detector_module() -> types.ModuleType:
    """`pytorch_ood.detector`, also where torchvision does not import.

    pytorch-ood's package import pulls in torchvision (for its datasets and model zoo), and
    PyPI's torchvision wheel is built against CUDA torch: beside the CPU torch wheel its compiled
    ops fail to load ("operator torchvision::nms does not exist"), so `make test` installs
    pytorch-ood without torchvision. The detectors need neither, so where torchvision is missing
    or broken the detector subpackage is loaded on its own.
    """
    try:
        return importlib.import_module("pytorch_ood.detector")
    except ModuleNotFoundError as err:
        if err.name == "pytorch_ood":
            raise ModuleNotFoundError(f"pytorch-ood is not installed: {INSTALL_HINT}") from err
        first = err
    except (RuntimeError, ImportError, OSError) as err:
        first = err
    log.info("pytorch_ood's package import failed (%s); loading pytorch_ood.detector alone", first)
    spec = importlib.util.find_spec("pytorch_ood")
    package = types.ModuleType("pytorch_ood")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["pytorch_ood"] = package
    return importlib.import_module("pytorch_ood.detector")


@dataclass
class LinearView:
    """logits = features(embeddings) @ weight.T + bias, exactly (checked), for ViM and DICE."""

    normalise: bool  # features are the unit-length embeddings (cosine heads) or the raw ones
    weight: Tensor  # C x D
    bias: Tensor  # C

    def features(self, embeddings: Tensor) -> Tensor:
        emb = embeddings.float()
        return F.normalize(emb, dim=1) if self.normalise else emb


@torch.no_grad()
def linear_view(model: OODClassifier, sample: Tensor) -> LinearView:
    """The head as a linear layer on the embeddings or on their directions.

    A softmax head is linear in the embedding; a cosine head (ArcFace, CosFace, NormSoftmax,
    AdaCos) is s * cos, linear in the unit embedding; SphereFace's |e||w| s cos is linear in the
    raw one. W and b come from the head's logits at 0 and at the basis vectors, then are checked
    against the head on `sample` (real embeddings), so a head that is neither is refused.
    """
    head = model.head
    dim = sample.shape[1]
    device = sample.device
    bias = head.logits(torch.zeros(1, dim, device=device)).float()[0]
    weight = (head.logits(torch.eye(dim, device=device)).float() - bias).T.contiguous()
    expected = head.logits(sample).float()
    tolerance = 1e-4 * max(float(expected.abs().max()), 1.0)
    for normalise in (False, True):
        view = LinearView(normalise, weight, bias)
        if torch.allclose(view.features(sample) @ weight.T + bias, expected, rtol=1e-4,
                          atol=tolerance):
            return view
    raise InputError(f"the {type(head).__name__} head is not linear in the embedding or in its "
                     "direction, so pytorch-ood's ViM/DICE cannot read it as a last layer")


class PoodScore:
    """One pytorch-ood detector on one classifier: built, fitted on ID training activations,
    shipped without its model callables (`unbind`), then bound to a scoring actor's model."""

    def __init__(self, score_name: str, model: OODClassifier, train: Activations | None = None,
                 labels: Tensor | None = None):
        self.name = score_name
        self.spec = pood_spec(score_name)
        self.view: LinearView | None = None
        if self.spec.reads == "linear":
            if train is None:
                raise InputError(f"{score_name} needs ID training embeddings to find the head's "
                                 "linear layer")
            self.view = linear_view(model, train.embeddings[:256].to(_device_of(model)))
        cls = getattr(_detector_module(), score_name.removeprefix(POOD_PREFIX))
        self.detector = cls(*self._inputs(), **self.spec.options)
        self.bind(model)
        if self.spec.fit:
            if train is None or labels is None:
                raise InputError(f"{score_name} is fitted on ID training data; none was given")
            self._fit(train, labels)

    def _inputs(self) -> tuple[Any, ...]:
        """Constructor arguments before the options; model callables are bound separately."""
        reads = self.spec.reads
        if reads == "linear":
            if self.name == POOD_PREFIX + "ViM":  # principal space: half the feature dimensions
                return None, self.view.weight.shape[1] // 2, self.view.weight, self.view.bias
            return None, self.view.weight, self.view.bias
        return (None, None) if reads.endswith("+head") else (None,)

    def _read(self, acts: Activations) -> Tensor:
        reads = self.spec.reads
        if reads == "logits":
            return acts.logits.float()
        if reads == "pooled+head":
            return acts.pooled.float()[:, :, None, None]
        if reads == "linear":
            return self.view.features(acts.embeddings)
        return acts.embeddings.float()

    def _fit(self, train: Activations, labels: Tensor) -> None:
        x, y = self._read(train).cpu(), labels.long().cpu()  # KNN fits sklearn on the CPU
        reads = self.spec.reads
        if reads == "logits":
            self.detector.fit_logits(x, y)
        elif reads == "pooled+head":
            self.detector.fit_feature_maps(x, y)
        else:
            self.detector.fit_features(x, y)

    def bind(self, model: OODClassifier) -> PoodScore:
        """Give the detector this process's model callables (after unpickling: `unbind`)."""
        reads = self.spec.reads
        if reads == "embeddings+head":
            self.detector.head = model.head.logits
        elif reads == "pooled+head":
            self.detector.head = _PooledHead(model)
        return self

    def unbind(self) -> PoodScore:
        """Drop the model callables, so the fitted state ships without the network."""
        if self.spec.reads.endswith("+head"):
            self.detector.head = None
        return self

    def __getstate__(self) -> dict[str, Any]:
        # The detector travels as bytes: unpickling it imports pytorch_ood, which must go
        # through `_detector_module` in a fresh worker (torchvision may not import there).
        return {**self.__dict__, "detector": pickle.dumps(self.detector)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        _detector_module()
        self.__dict__.update(state)
        self.detector = pickle.loads(state["detector"])

    def to(self, device: torch.device | str) -> PoodScore:
        self.detector.to(device)
        if self.view is not None:
            self.view = LinearView(self.view.normalise, self.view.weight.to(device),
                                   self.view.bias.to(device))
        return self

    @torch.no_grad()
    def __call__(self, acts: Activations) -> Tensor:
        """Scores with this project's sign: higher = more ID."""
        x = self._read(acts)
        reads = self.spec.reads
        if reads == "logits":
            out = self.detector.predict_logits(x)
        elif reads == "pooled+head":
            out = self.detector.predict_feature_maps(x)
        else:
            out = self.detector.predict_features(x)
        return -out.double()


class _PooledHead:
    """B x F x 1 x 1 activation maps → logits through the model's own embedding layer and head."""

    def __init__(self, model: OODClassifier):
        self.model = model

    def __call__(self, maps: Tensor) -> Tensor:
        return self.model.logits_from_pooled(maps.flatten(1))


def _device_of(model: OODClassifier) -> torch.device:
    return next(model.parameters()).device

