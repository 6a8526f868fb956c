"""Initialise a ResNet backbone from a local torchvision checkpoint, for OE fine-tuning (as
OpenOOD v1.5's ImageNet OE recipe fine-tunes a pretrained network rather than training anew).

The file is read as safetensors, or with `torch.load(weights_only=True)`: never unpickled.
torchvision's ResNet reads ImageNet-normalised inputs, ours read [-1, 1]; the normalisation is
folded into the first convolution and its BatchNorm, so the loaded network computes what
torchvision's computes on the same image (up to the zero padding at the border). The embedding
layer and the head replace torchvision's `fc` and start from their own initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from oodscale.classify.models import BasicBlock, Bottleneck, ResNet
from oodscale.errors import InputError, MissingError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a weights-only torch file (a bare state dict, or one
    under a `state_dict` / `model` key)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingError(f"train.init_checkpoint={str(path)!r}: no such file")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled objects beyond tensors are refused, by design
        raise InputError(f"train.init_checkpoint {file} is not a weights-only torch file "
                         f"({err}); save its state_dict, or convert it to safetensors") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def torchvision_names(backbone: ResNet) -> dict[str, str]:
    """Our parameter and buffer names → torchvision's (conv1, bn1, layerS.B.*, downsample)."""
    inner = {"body.0": "conv1", "body.1": "bn1", "body.3": "conv2", "body.4": "bn2",
             "body.6": "conv3", "body.7": "bn3", "shortcut.0": "downsample.0",
             "shortcut.1": "downsample.1"}
    names = {"features.0": "conv1", "features.1": "bn1"}
    stage, index = 1, -1
    for position, module in enumerate(backbone.features):
        if not isinstance(module, BasicBlock | Bottleneck):
            continue
        if index >= 0 and not isinstance(module.shortcut, nn.Identity):
            stage, index = stage + 1, 0  # a projected shortcut opens the next stage
        else:
            index += 1
        for ours, theirs in inner.items():
            names[f"features.{position}.{ours}"] = f"layer{stage}.{index}.{theirs}"
    mapping = {}
    for key in backbone.state_dict():
        prefix, _, leaf = key.rpartition(".")
        if prefix in names:
            mapping[key] = f"{names[prefix]}.{leaf}"
    return mapping


@torch.no_grad()
def init_from_torchvision(backbone: nn.Module, path: str | Path) -> int:
    """Load a torchvision ResNet checkpoint into `backbone`; returns the tensors loaded."""
    if not isinstance(backbone, ResNet) or not isinstance(backbone.features[3], nn.MaxPool2d):
        raise InputError("train.init_checkpoint loads torchvision ResNets: set train.backbone to "
                         "resnet18 or resnet50 and data.image_size above 64 (the standard "
                         "stride-2 stem)")
    state = read_state_dict(path)
    own = backbone.state_dict()
    loaded = {}
    for ours, theirs in torchvision_names(backbone).items():
        if theirs not in state:
            raise InputError(f"train.init_checkpoint {path} lacks {theirs!r}: not a torchvision "
                             f"checkpoint of this architecture")
        if state[theirs].shape != own[ours].shape:
            raise InputError(f"train.init_checkpoint {path}: {theirs} has shape "
                             f"{tuple(state[theirs].shape)}, this backbone needs "
                             f"{tuple(own[ours].shape)} (another depth or channel count?)")
        loaded[ours] = state[theirs].to(own[ours].dtype)
    _fold_normalisation(loaded)
    backbone.load_state_dict(loaded, strict=False)
    return len(loaded)


def _fold_normalisation(state: dict[str, torch.Tensor]) -> None:
    """x_tv = (x01 − m)/s with x01 = (x + 1)/2: conv1 on x_tv is conv1 scaled by 1/(2s) on x plus
    a constant per channel, which bn1's running mean absorbs."""
    weight = state["features.0.weight"].double()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)[None, :, None, None]
    offset = (weight * (0.5 - mean) / std).sum(dim=(1, 2, 3))
    state["features.0.weight"] = (weight / (2 * std)).to(state["features.0.weight"].dtype)
    running = state["features.1.running_mean"]
    state["features.1.running_mean"] = (running.double() - offset).to(running.dtype)
