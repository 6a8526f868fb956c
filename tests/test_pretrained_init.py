"""Initialising a ResNet from a torchvision checkpoint: names, the folded normalisation, and
refusals (no torchvision here: the checkpoint is written under torchvision's names)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from oodscale.classify.models import build_backbone
from oodscale.classify.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    init_from_torchvision,
    torchvision_names,
)
from tests.support import DIGITS


def _as_torchvision(backbone) -> dict[str, torch.Tensor]:
    state = backbone.state_dict()
    out = {theirs: state[ours].clone() for ours, theirs in torchvision_names(backbone).items()}
    out["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's classifier: not loaded
    return out


def test_names_follow_torchvision_layouts():
    r50 = torchvision_names(build_backbone("resnet50", 3, 224, 32))
    theirs = set(r50.values())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
                "layer3.5.conv3.weight", "layer4.2.bn3.num_batches_tracked"):
        assert key in theirs, key
    assert len(theirs) == 318  # torchvision resnet50 state_dict: 320 entries, 2 of them fc
    r18 = set(torchvision_names(build_backbone("resnet18", 3, 224, 32)).values())
    assert "layer2.0.downsample.1.weight" in r18 and "layer1.1.conv2.weight" in r18
    assert not any(k.startswith("layer1.0.downsample") for k in r18)  # identity shortcut


@torch.no_grad()
def test_loaded_stem_on_our_inputs_equals_torchvision_on_normalised_ones(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("resnet18", 3, 224, 32).eval()
    for m in source.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "resnet18.safetensors"
    save_file(_as_torchvision(source), str(path))
    target = build_backbone("resnet18", 3, 224, 32).eval()
    assert init_from_torchvision(target, path) == len(torchvision_names(target))
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # our range
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    normalised = ((x + 1) / 2 - mean) / std  # what torchvision's network reads
    ours, theirs = target.features[:2](x), source.features[:2](normalised)
    torch.testing.assert_close(ours[..., 2:-2, 2:-2], theirs[..., 2:-2, 2:-2], atol=1e-4,
                               rtol=1e-4)  # equal away from the zero-padded border
    deep = target.state_dict()["features.5.body.3.weight"]
    assert torch.equal(deep, source.state_dict()["features.5.body.3.weight"])


def test_refuses_a_small_stem_a_wrong_file_and_another_depth(tmp_path):
    r18 = build_backbone("resnet18", 3, 224, 32)
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": _as_torchvision(r18)}, path)  # weights-only torch file, wrapped
    assert init_from_torchvision(build_backbone("resnet18", 3, 224, 32), path) > 0
    with pytest.raises(ValueError, match="image_size above 64"):
        init_from_torchvision(build_backbone("resnet18", 3, 32, 32), path)
    with pytest.raises(ValueError, match="another depth"):
        init_from_torchvision(build_backbone("resnet50", 3, 224, 32), path)
    with pytest.raises(FileNotFoundError, match="init_checkpoint"):
        init_from_torchvision(r18, tmp_path / "missing.safetensors")


def test_config_refuses_an_init_checkpoint_for_a_non_resnet():

    from oodscale.config import ConfigError, load_config

    digits = DIGITS
    with pytest.raises(ConfigError, match="torchvision ResNets"):
        load_config(digits, ["train.init_checkpoint=/models/r50.safetensors"])
    cfg = load_config(digits, ["train.init_checkpoint=/m.safetensors", "train.backbone=resnet50"])
    assert cfg.train.init_checkpoint == "/m.safetensors"
