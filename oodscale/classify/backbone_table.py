"""The backbones `train.backbone` may name: one table the config validates against.

It imports nothing heavy; each row names its builder in `oodscale.classify.models`. Adding a
backbone: its builder and one row.
"""

from __future__ import annotations

from dataclasses import dataclass

from oodscale.errors import InputError


@dataclass(frozen=True)
class BackboneSpec:
    build: str  # "module:function(in_channels, image_size, embedding_dim) -> nn.Module"
    torchvision_init: bool = False  # train.init_checkpoint can load torchvision's weights


_MODELS = "oodscale.classify.models"
BACKBONES: dict[str, BackboneSpec] = {
    "smallcnn": BackboneSpec(f"{_MODELS}:small_cnn"),
    "resnet18": BackboneSpec(f"{_MODELS}:resnet18", torchvision_init=True),
    "resnet50": BackboneSpec(f"{_MODELS}:resnet50", torchvision_init=True),
    "wrn40_2": BackboneSpec(f"{_MODELS}:wrn40_2"),
}
BACKBONE_NAMES = tuple(BACKBONES)


def check_backbone(name: str) -> str:
    """`name` if the table has it, else an error listing the valid names."""
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)}")
    return name
