import pytest
import torch
from torch import nn

from oodscale.classify.backbone_table import BACKBONE_NAMES
from oodscale.classify.loss_table import LOSS_NAMES
from oodscale.classify.losses import kl_to_uniform
from oodscale.classify.models import OODClassifier, build_backbone, build_classifier

NUM_CLASSES, DIM = 5, 16


@pytest.mark.parametrize(
    ("name", "channels", "size"),
    [
        ("smallcnn", 1, 16),
        ("resnet18", 3, 32),
        ("resnet18", 3, 96),
        ("resnet50", 3, 16),
        ("wrn40_2", 3, 32),
    ],
)
def test_backbone_maps_images_to_embeddings(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name, channels, size, DIM)
    images = torch.rand(2, channels, size, size) * 2 - 1
    out = backbone(images)
    assert out.shape == (2, DIM)
    assert torch.isfinite(out).all()


def test_resnet_stem_adapts_to_image_size() -> None:
    def has_max_pool(size: int) -> bool:
        backbone = build_backbone("resnet18", 3, size, DIM)
        return any(isinstance(m, nn.MaxPool2d) for m in backbone.modules())

    assert not has_max_pool(32)
    assert has_max_pool(128)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        build_backbone("vit", 3, 32, DIM)
    for name in BACKBONE_NAMES:
        assert name in str(err.value)


def _model(head: str = "arcface") -> OODClassifier:
    torch.manual_seed(0)
    return build_classifier("smallcnn", head, 1, 16, NUM_CLASSES, DIM)


def test_forward_returns_logits_for_all_rows_and_loss_on_id_rows_only() -> None:
    model = _model().eval()  # eval: BatchNorm does not mix rows, so rows are independent
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2, 4])  # rows 0-3 are ID, rows 4-5 outliers
    logits, embeddings, id_loss = model(images, labels)
    assert logits.shape == (6, NUM_CLASSES)
    assert embeddings.shape == (6, DIM)
    torch.testing.assert_close(id_loss, model.head.id_loss(embeddings[:4], labels))
    # Changing the outlier images leaves the ID loss as it was.
    images[4:] = torch.rand(2, 1, 16, 16)
    _, _, id_loss_again = model(images, labels)
    torch.testing.assert_close(id_loss_again, id_loss)
    torch.testing.assert_close(model.embed_and_logits(images)[0], model(images, labels)[0])


def test_outlier_only_batch_gives_a_connected_zero_loss() -> None:
    model = _model()
    _, _, id_loss = model(torch.rand(3, 1, 16, 16), torch.empty(0, dtype=torch.long))
    assert id_loss.item() == 0.0
    id_loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_more_labels_than_images_is_an_error() -> None:
    with pytest.raises(ValueError, match="labels cover the ID rows"):
        _model()(torch.rand(2, 1, 16, 16), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("head", LOSS_NAMES)
def test_oe_step_reaches_every_parameter(head: str) -> None:
    model = _model(head).train()
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 0])  # rows 6-7 are outliers
    logits, _, id_loss = model(images, labels)
    (id_loss + 0.5 * kl_to_uniform(logits[6:])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_head_options_reach_the_head() -> None:
    model = build_classifier(
        "smallcnn", "cosface", 1, 16, NUM_CLASSES, DIM, head_options={"scale": 8.0}
    )
    assert model.head.loss.scale == 8.0


@pytest.mark.parametrize(("name", "channels", "size"),
                         [("smallcnn", 1, 16), ("resnet18", 3, 32), ("wrn40_2", 3, 32)])
def test_classifiers_are_channels_last_and_compute_what_nchw_does(name: str, channels: int,
                                                                   size: int) -> None:
    """The NHWC weights (the faster layout) change no result beyond float rounding, and an
    ordinary NCHW batch needs no conversion by the caller."""
    torch.manual_seed(0)
    model = build_classifier(name, "arcface", channels, size, NUM_CLASSES, DIM).eval()
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    nchw = build_classifier(name, "arcface", channels, size, NUM_CLASSES, DIM).eval()
    nchw.load_state_dict(model.state_dict())
    nchw = nchw.to(memory_format=torch.contiguous_format)
    images = torch.rand(4, channels, size, size) * 2 - 1
    with torch.no_grad():
        fast, plain = model.embed_and_logits(images), nchw.embed_and_logits(images)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
