"""Backbones (plain torch) and the classifier that joins a backbone to a loss head.

timm cannot be installed beside this torch (it needs torchvision), so the standard architectures
are written out here: a small CNN for the embedded digits run, ImageNet-style ResNets whose stem
adapts to small images, and the Wide-ResNet-40-2 of the outlier-exposure paper.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from oodscale.classify.backbone_table import BACKBONES, check_backbone
from oodscale.classify.losses import ClassifierHead, build_head
from oodscale.errors import InputError
from oodscale.lazy import load

# Images up to this size get a CIFAR-style stem (3×3 conv, stride 1, no max-pool), so a 16×16 or
# 32×32 input is not reduced to 1×1 before the last stage.
SMALL_IMAGE_MAX = 64

WRN_DROPOUT = 0.3  # the dropout rate the OE paper trained its WRN-40-2 baselines with


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]


class SmallCNN(nn.Module):
    """Three conv blocks and global pooling: enough for 16×16 digits and fast on a CPU."""

    def __init__(self, in_channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            *_conv_bn_relu(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embed = nn.Linear(128, embedding_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(self.features(images))


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3×3 convs with an identity or projected shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = _projection(in_ch, out_ch, stride)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet-50 block: 1×1 reduce, 3×3 (strided, as in torchvision's v1.5), 1×1 expand ×4."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = _projection(in_ch, out_ch, stride)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class ResNet(nn.Module):
    """ImageNet ResNet with a linear embedding instead of the classifier layer."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, int, int, int],
        in_channels: int,
        image_size: int,
        embedding_dim: int,
    ) -> None:
        super().__init__()
        stem: list[nn.Module]
        if image_size <= SMALL_IMAGE_MAX:
            stem = [nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)]
            stem += [nn.ReLU()]
        else:
            stem = [nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)]
            stem += [nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)]
        stages: list[nn.Module] = []
        in_ch = 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(block(in_ch, width, stride))
                in_ch = width * block.expansion
        self.features = nn.Sequential(*stem, *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Linear(in_ch, embedding_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(self.features(images))


class WideBlock(nn.Module):
    """Pre-activation wide block (BN-ReLU-conv twice, dropout between; Zagoruyko & Komodakis)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        )
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1 and in_ch == out_ch
            else nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.pre(x)
        # A projected shortcut reads the activated input, an identity one the raw input.
        skip = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(activated)
        return self.body(activated) + skip


class WideResNet(nn.Module):
    """WRN-depth-k for 32×32-style inputs: three groups of (depth−4)/6 wide blocks."""

    def __init__(
        self, depth: int, widen: int, in_channels: int, embedding_dim: int, dropout: float
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise InputError(f"WRN depth must be 6n+4, got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)]
        in_ch = 16
        for i, width in enumerate(widths):
            for j in range(blocks_per_group):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(WideBlock(in_ch, width, stride, dropout))
                in_ch = width
        layers += [nn.BatchNorm2d(in_ch), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.embed = nn.Linear(in_ch, embedding_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(self.features(images))


def _init_weights(module: nn.Module) -> None:
    # He initialisation for convs and unit BatchNorm, as the ResNet and WRN papers train from.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# The builders `backbone_table.BACKBONES` names: (in channels, image size, embedding dim).
def small_cnn(c: int, size: int, d: int) -> nn.Module:
    return SmallCNN(c, d)


def resnet18(c: int, size: int, d: int) -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), c, size, d)


def resnet50(c: int, size: int, d: int) -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3), c, size, d)


def wrn40_2(c: int, size: int, d: int) -> nn.Module:
    return WideResNet(40, 2, c, d, WRN_DROPOUT)


def build_backbone(name: str, in_channels: int, image_size: int, embedding_dim: int) -> nn.Module:
    """Module mapping (B, C, H, W) images in [-1, 1] to (B, embedding_dim) embeddings."""
    backbone = load(BACKBONES[check_backbone(name)].build)(in_channels, image_size,
                                                           embedding_dim)
    _init_weights(backbone)
    return backbone


class Activations(NamedTuple):
    logits: Tensor  # (B, C), what the head's softmax reads
    embeddings: Tensor  # (B, D), the backbone's output and the head's input
    pooled: Tensor  # (B, F), pooled penultimate activations, the embedding layer's input


class OODClassifier(nn.Module):
    """Backbone + head in one forward, so DDP sees and syncs every parameter each step.

    A training batch stacks ID rows first and outlier rows after them: all rows get logits (the
    OE term needs them), only the first `len(labels)` rows enter the head's loss. Splitting by
    position rather than by a label mask keeps the step free of host syncs and of tensors built
    on the wrong device.
    """

    def __init__(self, backbone: nn.Module, head: ClassifierHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def embed_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, embeddings) for inference."""
        embeddings = self.backbone(images)
        return self.head.logits(embeddings), embeddings

    def activations(self, images: Tensor) -> Activations:
        """Logits, embeddings and the pooled penultimate activations of one forward pass.

        Activation-shaping detectors (ReAct, ASH, SCALE) read the pooled, post-ReLU features
        before the embedding layer; every backbone here is `features` then `embed`.
        """
        pooled = self.backbone.features(images)
        embeddings = self.backbone.embed(pooled)
        return Activations(self.head.logits(embeddings), embeddings, pooled)

    def logits_from_pooled(self, pooled: Tensor) -> Tensor:
        """The rest of the network after `activations(...).pooled`: embedding layer + head."""
        return self.head.logits(self.backbone.embed(pooled))

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, embeddings, id_loss) for images whose first len(labels) rows are ID.

        id_loss is a graph-connected zero when there are no ID rows.
        """
        n_id = len(labels)
        if n_id > len(images):
            raise InputError(f"{n_id} labels for {len(images)} images: labels cover the ID rows, "
                             "which come first")
        logits, embeddings = self.embed_and_logits(images)
        if n_id:
            id_loss = self.head.id_loss(embeddings[:n_id], labels)
        else:
            id_loss = logits.sum() * 0.0
        return logits, embeddings, id_loss


def build_classifier(
    backbone: str,
    head: str,
    in_channels: int,
    image_size: int,
    num_classes: int,
    embedding_dim: int,
    head_options: dict[str, Any] | None = None,
) -> OODClassifier:
    """Classifier from config names; see `build_backbone` and `build_head`.

    Its weights are channels-last (NHWC): oneDNN and cuDNN run NHWC convolutions faster, and a
    channels-last weight makes the convolution of an ordinary NCHW input run NHWC too, so
    callers need not convert their batches. On the 2-core CPU the smallcnn's OE step ran
    1.3-1.4x and its evaluation 1.35-1.7x faster (bench/bench_channels_last.py).
    """
    model = OODClassifier(
        build_backbone(backbone, in_channels, image_size, embedding_dim),
        build_head(head, embedding_dim, num_classes, head_options),
    )
    return model.to(memory_format=torch.channels_last)
