"""The generator interface, and the table `generate.generator` names.

A generator is whatever the generate stage samples label-mixup outliers from: the project's own
label-conditioned UNet (trained by train-diffusion) or a pretrained latent DiT (+ VAE). Sampling
sees only this interface: the noise prediction under soft labels (with the unconditional input
for classifier-free guidance), the shape it denoises, and the decode to pixels. Every generator
has a model card (JSON beside its weights in the run) with a content hash that every synthetic
sample records.

This module imports nothing heavy, so validating a config stays cheap; the table names each
implementation's module (and, for one trained here, its model builder). Adding a generator:
its module and one row here.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oodscale.errors import InputError, MissingError
from oodscale.lazy import load

if TYPE_CHECKING:
    from oodscale.config import ExperimentConfig
    from oodscale.runtime import RunLayout, Storage

MODEL_CARD = "model.json"  # in <run>/diffusion, written last: its presence means it is ready


class Generator(abc.ABC):
    """A class-conditional diffusion model driven by soft labels over its own classes."""

    num_classes: int  # the generator's own classes (1000 for an ImageNet DiT)
    latent_shape: tuple[int, int, int]  # C×H×W of what the denoiser sees (pixels or latents)
    image_size: int  # side of the decoded images
    channels: int  # channels of the decoded images

    @abc.abstractmethod
    def to(self, device: Any) -> Generator:
        """Move the weights to `device`; returns self."""

    @abc.abstractmethod
    def condition(self, labels: Any) -> Any:
        """Soft labels (B×num_classes, rows e.g. λ·e_a + (1−λ)·e_b) → the denoiser's input."""

    @abc.abstractmethod
    def null_condition(self, count: int) -> Any:
        """The unconditional input of classifier-free guidance, `count` rows."""

    @abc.abstractmethod
    def predict_noise(self, noisy: Any, timesteps: Any, condition: Any) -> Any:
        """The predicted noise ε(x_t, t, condition), shaped like `noisy`."""

    @abc.abstractmethod
    def decode(self, sample: Any) -> Any:
        """Denoised samples → images B×C×H×W in [-1, 1]."""

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write the weights in diffusers' `save_pretrained` layout (safetensors)."""

    @property
    @abc.abstractmethod
    def schedule(self) -> dict[str, Any]:
        """The noise schedule it was trained with: `timesteps` plus diffusers scheduler options."""

    @classmethod
    @abc.abstractmethod
    def load(cls, storage: Storage, diffusion_dir: str, card: dict[str, Any]) -> Generator:
        """The generator a model card describes, in eval mode on the CPU."""

    @classmethod
    @abc.abstractmethod
    def model_card(cls, cfg: ExperimentConfig, layout: RunLayout) -> dict[str, Any]:
        """The card of the generator the config names, ready to sample from: what
        train-diffusion wrote, or for pretrained weights one written now (source, hash)."""


@dataclass(frozen=True)
class GeneratorSpec:
    """One row of the table."""

    implementation: str  # "module:Class" (a Generator), imported when a generator is loaded
    # Trained here: "module:function(cfg, id train manifest) -> diffusers ModelMixin" whose
    # forward(noisy, timesteps, soft labels) predicts the noise; train-diffusion trains and
    # publishes it under TRAINED_DIR. None: pretrained weights, nothing to train.
    model: str | None = None
    # The generation params (what a rerun must match to resume) name the generator, its
    # source, class map and image size. The DDPM's runs from before the table did not record
    # them, so its row keeps them out and those runs still resume.
    params_name_generator: bool = True

    @property
    def trained_here(self) -> bool:
        return self.model is not None


GENERATORS: dict[str, GeneratorSpec] = {
    "ddpm": GeneratorSpec("oodscale.diffusion.model:UNetGenerator",
                          model="oodscale.diffusion.model:build_unet",
                          params_name_generator=False),
    "dit": GeneratorSpec("oodscale.diffusion.dit:DiTGenerator"),
}
# <run>/diffusion/<TRAINED_DIR>: the published weights of a generator trained here (the name
# predates the table, when the DDPM's UNet was the only one)
TRAINED_DIR = "unet"


def generator_class(name: str) -> type:
    """The implementation class of a generator name in the table."""
    if name not in GENERATORS:
        raise InputError(f"unknown generator {name!r}; valid: {', '.join(GENERATORS)}")
    return load(GENERATORS[name].implementation)


def model_card(cfg: ExperimentConfig, layout: RunLayout) -> dict[str, Any]:
    """The ready card of the config's generator (see `Generator.model_card`)."""
    return generator_class(cfg.generate.generator).model_card(cfg, layout)


def load_generator(storage: Storage, diffusion_dir: str, card: dict[str, Any]) -> Generator:
    """The generator a card (as `model_card` returns it) describes."""
    return generator_class(card["generator"]).load(storage, diffusion_dir, card)


def content_hash(directory: str | Path) -> str:
    """Short content hash of every safetensors file under a saved model directory (subfolders
    such as transformer/ and vae/ included), recorded in every synthetic sample."""
    root = Path(directory)
    files = sorted(root.rglob("*.safetensors"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise MissingError(f"no *.safetensors weights under {root}; save the model with "
                                f"save_pretrained(..., safe_serialization=True)")
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]
