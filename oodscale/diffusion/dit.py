"""A pretrained latent DiT (+ VAE) behind the generator interface: label-mixup in its
class-embedding space.

diffusers' `DiTTransformer2DModel` embeds an integer class through a table E (one per block, in
each block's adaLN-Zero `norm1.emb.class_embedder`), whose extra last row is the null class that
classifier-free guidance conditions on. Here every such embedder also takes a soft label y, a
row vector over the table's rows, and returns y·E: a one-hot is exactly the integer lookup, the
label-mixup y = λ·e_a + (1−λ)·e_b gives λ·E[a] + (1−λ)·E[b] (the mix of two embedding rows),
`sum` mode E[a] + E[b], and e_null the unconditional input.

Weights come from a local directory or a hub id in diffusers' `save_pretrained` layout (a
DiTPipeline directory: transformer/, vae/, optionally scheduler/ and model_index.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodscale.config import ExperimentConfig
from oodscale.diffusion.classmap import generator_class_names
from oodscale.diffusion.generators import MODEL_CARD, Generator, content_hash
from oodscale.errors import InputError, MissingError
from oodscale.runtime import RunLayout, Storage

# DiT's published schedule (scheduler/scheduler_config.json of facebook/DiT-XL-2-256), used when
# the weights come without a scheduler config. Latents are not confined to [-1, 1]: no clipping.
DEFAULT_SCHEDULE = {"timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
                    "beta_end": 0.02, "clip_sample": False}


class SoftLabelEmbedding(nn.Module):
    """diffusers' `LabelEmbedding` (same table, same state-dict key) that also takes soft
    labels: float rows y over the table's rows give y·E, integer labels the plain lookup."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.embedding_table: nn.Embedding = inner.embedding_table
        self.num_classes: int = inner.num_classes

    def forward(self, labels: torch.Tensor, force_drop_ids: Any = None) -> torch.Tensor:
        if not labels.is_floating_point():
            return self.embedding_table(labels)
        weight = self.embedding_table.weight
        # In float32 outside autocast: a one-hot row then gives the table row bit for bit, as
        # the lookup does, whatever precision the rest of the step runs in.
        with torch.autocast(labels.device.type, enabled=False):
            return (labels.float() @ weight.float()).to(weight.dtype)


def accept_soft_labels(transformer: nn.Module) -> list[SoftLabelEmbedding]:
    """Swap every block's class embedder for its soft-label version; returns them."""
    embedders = []
    for block in transformer.transformer_blocks:
        emb = block.norm1.emb
        if not isinstance(emb.class_embedder, SoftLabelEmbedding):
            emb.class_embedder = SoftLabelEmbedding(emb.class_embedder)
        embedders.append(emb.class_embedder)
    return embedders


class DiTGenerator(Generator):
    """A DiT denoising VAE latents, conditioned on soft labels over its classes."""

    def __init__(self, transformer: nn.Module, vae: nn.Module,
                 schedule: dict[str, Any] | None = None) -> None:
        self.transformer, self.vae = transformer.eval(), vae.eval()
        table = accept_soft_labels(transformer)[0]
        self.num_classes = table.num_classes
        self.rows = table.embedding_table.num_embeddings  # num_classes + 1 with a null class
        config = transformer.config
        self.latent_shape = (config.in_channels, config.sample_size, config.sample_size)
        self.image_size = config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = vae.config.out_channels
        self._schedule = dict(schedule or DEFAULT_SCHEDULE)

    def to(self, device: torch.device | str) -> DiTGenerator:
        self.transformer.to(device)
        self.vae.to(device)
        return self

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.shape[-1] != self.num_classes:
            raise InputError(f"soft labels have {labels.shape[-1]} entries; the DiT has "
                             f"{self.num_classes} classes")
        pad = labels.new_zeros(len(labels), self.rows - self.num_classes)
        return torch.cat([labels.float(), pad], dim=1)

    def null_condition(self, count: int) -> torch.Tensor:
        if self.rows == self.num_classes:
            raise InputError("this DiT has no null class (trained without label dropout), so "
                             "classifier-free guidance is impossible: set generate.guidance=1")
        null = torch.zeros(count, self.rows)
        null[:, self.num_classes] = 1.0
        return null

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                      condition: torch.Tensor) -> torch.Tensor:
        out = self.transformer(noisy, timestep=timesteps, class_labels=condition).sample
        channels = noisy.shape[1]
        return out[:, :channels]  # a learned-sigma DiT also predicts the variance: dropped

    def decode(self, sample: torch.Tensor) -> torch.Tensor:
        latents = sample / self.vae.config.scaling_factor
        return self.vae.decode(latents.to(next(self.vae.parameters()).dtype)).sample

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.transformer.save_pretrained(directory / "transformer", safe_serialization=True)
        self.vae.save_pretrained(directory / "vae", safe_serialization=True)
        scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps":
                     self._schedule["timesteps"],
                     **{k: v for k, v in self._schedule.items() if k != "timesteps"}}
        (directory / "scheduler").mkdir(parents=True, exist_ok=True)
        (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))

    @property
    def schedule(self) -> dict[str, Any]:
        return dict(self._schedule)

    @classmethod
    def from_directory(cls, directory: Path) -> DiTGenerator:
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        # safetensors only: weights are never unpickled
        return cls(DiTTransformer2DModel.from_pretrained(directory, subfolder="transformer",
                                                         use_safetensors=True),
                   AutoencoderKL.from_pretrained(directory, subfolder="vae",
                                                 use_safetensors=True),
                   read_schedule(directory))

    @classmethod
    def load(cls, storage: Storage, diffusion_dir: str, card: dict[str, Any]) -> DiTGenerator:
        directory = resolve_weights(card["source"])
        found = content_hash(directory)
        if found != card["model_hash"]:
            raise InputError(f"the DiT weights at {directory} changed since the run's model card "
                             f"was written (hash {found} != {card['model_hash']}); delete "
                             f"{diffusion_dir}/{MODEL_CARD} and the synthetic shards drawn "
                             f"from the old weights, or point generate.pretrained at those")
        return cls.from_directory(directory)

    @classmethod
    def model_card(cls, cfg: ExperimentConfig, layout: RunLayout) -> dict[str, Any]:
        """Written into the run on each generate, so the run records where its weights came
        from and which ones they were."""
        source = cfg.generate.pretrained
        directory = resolve_weights(source)
        from diffusers import DiTTransformer2DModel

        config = DiTTransformer2DModel.load_config(directory, subfolder="transformer")
        vae = json.loads((directory / "vae" / "config.json").read_text())
        num_classes = config["num_embeds_ada_norm"]
        card = {"generator": "dit", "source": source, "weights_dir": str(directory),
                "model_hash": content_hash(directory), "num_classes": num_classes,
                "class_names": generator_class_names(cfg.generate.class_list, directory,
                                                     num_classes),
                "class_list": cfg.generate.class_list,
                "image_size": config["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1),
                "channels": vae["out_channels"], "schedule": read_schedule(directory)}
        path = f"{layout.diffusion_dir}/{MODEL_CARD}"
        encoded = json.dumps(card, indent=2).encode()
        if not layout.storage.exists(path) or layout.storage.read_bytes(path) != encoded:
            layout.storage.write_bytes_atomic(path, encoded)
        return card


def read_schedule(directory: Path) -> dict[str, Any]:
    """The noise schedule in `scheduler/scheduler_config.json`, else DiT's published one."""
    path = Path(directory) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return dict(DEFAULT_SCHEDULE)
    raw = json.loads(path.read_text())
    schedule = {"timesteps": raw.get("num_train_timesteps", DEFAULT_SCHEDULE["timesteps"])}
    for key in ("beta_schedule", "beta_start", "beta_end", "clip_sample"):
        schedule[key] = raw.get(key, DEFAULT_SCHEDULE[key])
    return schedule


def resolve_weights(source: str | None) -> Path:
    """A local directory holding transformer/ and vae/: `source` itself, or a hub id's
    snapshot (downloaded once into the hub cache of the node that asks)."""
    if not source:
        raise InputError("generate.generator=dit needs generate.pretrained: a directory in "
                         "diffusers' save_pretrained layout (transformer/, vae/) or a hub id "
                         "such as facebook/DiT-XL-2-256")
    path = Path(source).expanduser()
    if not path.is_dir():
        if path.exists() or source.startswith(("/", ".", "~")) or source.count("/") != 1:
            raise MissingError(f"generate.pretrained={source!r}: no such directory (a hub "
                                    f"id looks like owner/name)")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(source, allow_patterns=[
                "model_index.json", "scheduler/*.json", *(f"{sub}/*.{ext}" for sub in (
                    "transformer", "vae") for ext in ("json", "safetensors"))]))
        except Exception as err:  # offline, unknown repo, no access: all say the same to us
            raise MissingError(f"generate.pretrained={source!r} is not a local directory "
                                    f"and the hub did not give it ({err}); download it "
                                    f"beforehand and give the directory") from err
    missing = [sub for sub in ("transformer", "vae") if not (path / sub).is_dir()]
    if missing:
        raise MissingError(f"generate.pretrained={source!r}: {path} lacks {missing}; a DiT "
                                f"is saved as a DiTPipeline (transformer/, vae/)")
    return path.resolve()
