import math

import pytest
import torch
import torch.nn.functional as F

from oodscale.classify.loss_table import LOSS_NAMES
from oodscale.classify.losses import AdaCosHead, build_head, kl_to_uniform

NUM_CLASSES, DIM = 4, 8


def _separable_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(NUM_CLASSES, 2, generator=gen) * 3
    labels = torch.arange(NUM_CLASSES).repeat_interleave(8)
    points = centers[labels] + 0.1 * torch.randn(len(labels), 2, generator=gen)
    return points, labels


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_each_loss_is_finite_and_decreases(name: str) -> None:
    torch.manual_seed(0)
    points, labels = _separable_batch()
    encoder = torch.nn.Linear(2, DIM)
    head = build_head(name, DIM, NUM_CLASSES)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=0.05)
    history = []
    for _ in range(30):
        loss = head.id_loss(encoder(points), labels)
        assert loss.dim() == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0]
    with torch.no_grad():
        predictions = head.logits(encoder(points)).argmax(dim=1)
    assert (predictions == labels).float().mean() == 1.0


def _cosine(embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings, dim=1) @ F.normalize(weights, dim=1).t()


@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface", "normsoftmax"])
def test_metric_logits_come_from_the_pml_loss_without_margin(name: str) -> None:
    torch.manual_seed(0)
    head = build_head(name, DIM, NUM_CLASSES)
    embeddings = torch.randn(12, DIM)
    labels = torch.arange(12) % NUM_CLASSES
    logits = head.logits(embeddings)
    torch.testing.assert_close(logits, head.loss.get_logits(embeddings))
    assert head.class_weights.shape == (NUM_CLASSES, DIM)
    torch.testing.assert_close(head.class_weights, head.loss.W.t())
    cosine = _cosine(embeddings, head.class_weights)
    if name in ("arcface", "cosface"):
        torch.testing.assert_close(logits, head.loss.scale * cosine)
    elif name == "sphereface":
        norms = embeddings.norm(dim=1, keepdim=True)
        torch.testing.assert_close(logits, head.loss.scale * norms * cosine)
    else:
        torch.testing.assert_close(logits, cosine / head.loss.temperature)
    margin_free_ce = F.cross_entropy(logits, labels)
    if name == "normsoftmax":  # no margin at all: training loss is CE of the same logits
        torch.testing.assert_close(head.id_loss(embeddings, labels), margin_free_ce)
    else:  # the margin only penalises the true class, so the training loss is larger
        assert head.id_loss(embeddings, labels) > margin_free_ce + 1e-3


def test_softmax_head_is_a_linear_layer() -> None:
    head = build_head("softmax", DIM, NUM_CLASSES)
    embeddings = torch.randn(5, DIM)
    torch.testing.assert_close(
        head.logits(embeddings),
        embeddings @ head.class_weights.t() + head.linear.bias,
    )


def test_options_reach_the_pml_constructor() -> None:
    head = build_head("arcface", DIM, NUM_CLASSES, {"scale": 16.0, "margin": 10.0})
    assert head.loss.scale == 16.0
    assert head.loss.margin == pytest.approx(math.radians(10.0))
    embeddings = torch.randn(3, DIM)
    torch.testing.assert_close(
        head.logits(embeddings), 16.0 * _cosine(embeddings, head.class_weights)
    )


def test_unknown_loss_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        build_head("triplet", DIM, NUM_CLASSES)
    for name in LOSS_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["arcface", "softmax", "adacos"])
def test_unknown_option_is_named(name: str) -> None:
    with pytest.raises(ValueError, match="temprature"):
        build_head(name, DIM, NUM_CLASSES, {"temprature": 0.1})


def _adacos_on_known_angles(angles: list[float]) -> tuple[AdaCosHead, torch.Tensor, torch.Tensor]:
    """3 classes with axis-aligned weights; row i sits at angle α_i from its class axis."""
    head = AdaCosHead(embedding_dim=3, num_classes=3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
    labels = torch.tensor([0, 1, 2])
    embeddings = torch.zeros(3, 3)
    for i, alpha in enumerate(angles):
        embeddings[i, i] = math.cos(alpha)
        embeddings[i, (i + 1) % 3] = math.sin(alpha)
    return head, embeddings, labels


@pytest.mark.parametrize("angles", [[0.2, 0.5, 1.2], [1.0, 1.1, 1.3]])
def test_adacos_scale_follows_the_paper(angles: list[float]) -> None:
    head, embeddings, labels = _adacos_on_known_angles(angles)
    s0 = math.sqrt(2) * math.log(3 - 1)
    assert head.scale.item() == pytest.approx(s0)
    # Non-target cosines per row are sin(α) and 0; the median angle is capped at π/4.
    b_avg = sum(math.exp(s0 * math.sin(a)) + 1.0 for a in angles) / 3
    expected = math.log(b_avg) / math.cos(min(math.pi / 4, sorted(angles)[1]))
    head.train()
    loss = head.id_loss(embeddings, labels)
    assert head.scale.item() == pytest.approx(expected, rel=1e-5)
    assert head.scale.item() != pytest.approx(s0)
    cosine = _cosine(embeddings, head.weight)
    torch.testing.assert_close(loss, F.cross_entropy(expected * cosine, labels))
    torch.testing.assert_close(head.logits(embeddings), expected * cosine)


def test_adacos_scale_is_a_checkpointed_buffer_frozen_in_eval() -> None:
    head, embeddings, labels = _adacos_on_known_angles([0.2, 0.5, 1.2])
    assert "scale" in head.state_dict()
    assert all(p is not head.scale for p in head.parameters())
    head.eval()
    before = head.scale.clone()
    head.id_loss(embeddings, labels)
    torch.testing.assert_close(head.scale, before)


def test_adacos_backward_survives_scale_update_after_logits() -> None:
    head = build_head("adacos", DIM, NUM_CLASSES)
    embeddings = torch.randn(8, DIM, requires_grad=True)
    labels = torch.arange(8) % NUM_CLASSES
    logits = head.logits(embeddings)  # uses the scale before the update below
    loss = head.id_loss(embeddings, labels) + kl_to_uniform(logits)
    loss.backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_kl_to_uniform_zero_only_for_uniform_output() -> None:
    uniform = torch.full((4, 10), 3.7)
    assert kl_to_uniform(uniform).abs().item() < 1e-6
    logits = torch.randn(4, 10, requires_grad=True)
    kl = kl_to_uniform(logits)
    probs = logits.softmax(dim=1)
    direct = (0.1 * torch.log(0.1 / probs)).sum(dim=1).mean()
    torch.testing.assert_close(kl, direct)
    assert kl.item() > 0
    kl.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_kl_to_uniform_is_stable_for_large_logits() -> None:
    logits = torch.tensor([[1000.0, 0.0, 0.0]])
    kl = kl_to_uniform(logits)
    assert torch.isfinite(kl)
    assert kl.item() == pytest.approx(1000.0 * 2 / 3 - math.log(3), rel=1e-4)


def test_kl_to_uniform_empty_batch_is_connected_zero() -> None:
    logits = torch.randn(0, 5, requires_grad=True)
    kl = kl_to_uniform(logits)
    assert kl.item() == 0.0
    assert kl.requires_grad
    kl.backward()
    assert logits.grad is not None
