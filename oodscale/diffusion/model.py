"""The class-conditional DDPM: a diffusers UNet2DModel fed a soft label vector.

The UNet's class embedding is `identity`, so it adds whatever vector we give it to the time
embedding; a learned bias-free linear map turns a soft label y ∈ R^C into that vector. The zero
vector is therefore the unconditional input (classifier-free guidance), a one-hot the class, and
a mix of two one-hots the label-mixup condition.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from oodscale.runtime import Storage
from oodscale.weights import require_safetensors


class LabelConditionedUNet(ModelMixin, ConfigMixin):
    """UNet2DModel plus a soft-label projection, saved and loaded with `save_pretrained`."""

    @register_to_config
    def __init__(self, num_classes: int, sample_size: int, in_channels: int,
                 block_out_channels: tuple[int, ...] = (32, 32), layers_per_block: int = 1,
                 attention: bool = False):
        super().__init__()
        levels = len(block_out_channels)
        low = "Attn" if attention else ""  # self-attention at the lowest resolution only
        down = ("DownBlock2D",) * (levels - 1) + (f"{low}DownBlock2D",)
        up = (f"{low}UpBlock2D",) + ("UpBlock2D",) * (levels - 1)
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=down, up_block_types=up, class_embed_type="identity",
            norm_num_groups=8, attention_head_dim=8,
        )
        self.label_proj = nn.Linear(num_classes, block_out_channels[0] * 4, bias=False)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """Predicted noise for `noisy` at `timesteps` under soft labels (B×C)."""
        if labels.shape[-1] != self.config.num_classes:
            raise ValueError(f"label vectors have {labels.shape[-1]} entries, the model was "
                             f"trained on {self.config.num_classes} classes")
        class_emb = self.label_proj(labels.to(self.label_proj.weight.dtype))
        return self.unet(noisy, timesteps, class_labels=class_emb).sample


def model_hash(directory: str | Path) -> str:
    """Short content hash of a saved model's weights, recorded in every synthetic sample."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def load_unet(storage: Storage, unet_dir: str) -> LabelConditionedUNet:
    """The saved DDPM from any storage root, in eval mode."""
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.fetch_dir(unet_dir, Path(tmp))
        require_safetensors(local / "diffusion_pytorch_model.safetensors")  # never a pickle
        return LabelConditionedUNet.from_pretrained(local, use_safetensors=True).eval()
