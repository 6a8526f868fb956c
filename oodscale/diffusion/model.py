"""The class-conditional DDPM: a diffusers UNet2DModel fed a soft label vector.

The UNet's class embedding is `identity`, so it adds whatever vector we give it to the time
embedding; a learned bias-free linear map turns a soft label y ∈ R^C into that vector. The zero
vector is therefore the unconditional input (classifier-free guidance), a one-hot the class, and
a mix of two one-hots the label-mixup condition.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from oodscale.config import ExperimentConfig
from oodscale.diffusion.generators import MODEL_CARD, TRAINED_DIR, Generator
from oodscale.errors import InputError, MissingError
from oodscale.runtime import RunLayout, Storage
from oodscale.weights import require_safetensors

if TYPE_CHECKING:
    from oodscale.data.shards import Manifest


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
            raise InputError(f"label vectors have {labels.shape[-1]} entries, the model was "
                             f"trained on {self.config.num_classes} classes")
        class_emb = self.label_proj(labels.to(self.label_proj.weight.dtype))
        return self.unet(noisy, timesteps, class_labels=class_emb).sample


def build_unet(cfg: ExperimentConfig, manifest: Manifest) -> LabelConditionedUNet:
    """The untrained UNet the config describes, for the ID data `manifest` lists (the
    `ddpm` row's model, trained by train-diffusion)."""
    d = cfg.diffusion
    return LabelConditionedUNet(
        num_classes=len(manifest.class_names), sample_size=manifest.image_size,
        in_channels=manifest.channels, block_out_channels=tuple(d.block_out_channels),
        layers_per_block=d.layers_per_block, attention=d.attention)


def load_unet(storage: Storage, unet_dir: str) -> LabelConditionedUNet:
    """The saved DDPM from any storage root, in eval mode."""
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.fetch_dir(unet_dir, Path(tmp))
        require_safetensors(local / "diffusion_pytorch_model.safetensors")  # never a pickle
        return LabelConditionedUNet.from_pretrained(local, use_safetensors=True).eval()


class UNetGenerator(Generator):
    """The project's own DDPM behind the generator interface: it denoises pixels (nothing to
    decode) and takes the soft label itself, the zero vector being the unconditional input."""

    def __init__(self, model: LabelConditionedUNet, timesteps: int) -> None:
        self.model, self.timesteps = model, timesteps
        config = model.config
        self.num_classes = config.num_classes
        self.latent_shape = (config.in_channels, config.sample_size, config.sample_size)
        self.image_size, self.channels = config.sample_size, config.in_channels

    def to(self, device: torch.device | str) -> UNetGenerator:
        self.model.to(device)
        return self

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def null_condition(self, count: int) -> torch.Tensor:
        return torch.zeros(count, self.num_classes)

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                      condition: torch.Tensor) -> torch.Tensor:
        return self.model(noisy, timesteps, condition)

    def decode(self, sample: torch.Tensor) -> torch.Tensor:
        return sample

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)

    @property
    def schedule(self) -> dict[str, Any]:
        return {"timesteps": self.timesteps}  # samplers' default: the cosine schedule it trains on

    @classmethod
    def load(cls, storage: Storage, diffusion_dir: str, card: dict[str, Any]) -> UNetGenerator:
        return cls(load_unet(storage, f"{diffusion_dir}/{TRAINED_DIR}"), card["timesteps"])

    @classmethod
    def model_card(cls, cfg: ExperimentConfig, layout: RunLayout) -> dict[str, Any]:
        path = f"{layout.diffusion_dir}/{MODEL_CARD}"
        if not layout.storage.exists(path):
            raise MissingError(f"no trained DDPM at "
                                    f"{layout.storage.uri_of(layout.diffusion_dir)}: run "
                                    f"`oodscale train-diffusion` first")
        # cards written before the generator table are the DDPM's and carry neither key
        card = {"generator": "ddpm", "source": "train-diffusion",
                **json.loads(layout.storage.read_bytes(path))}
        if card["generator"] != cfg.generate.generator:
            raise InputError(f"{layout.storage.uri_of(path)} is the card of the pretrained "
                             f"{card['generator']} generator ({card.get('source')}), not of a "
                             f"trained DDPM; give this config its own experiment name (a DDPM "
                             f"and a {card['generator']} cannot share one run root)")
        return card
