"""Typed experiment configuration: YAML plus dotted command-line overrides, validated up front.

Every stage reads the same `ExperimentConfig`, so a typo or an impossible value stops the job
before any Ray work starts, with a message that names the offending key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from oodscale.errors import InputError


def _known_loss(name: str) -> str:
    from oodscale.classify.loss_table import check_loss_options  # the loss table

    check_loss_options(name)
    return name


LossName = Annotated[str, AfterValidator(_known_loss)]  # checked against classify.loss_table


def _known_source(name: str) -> str:
    from oodscale.outlier_sources import check_source_name  # the outlier-source table

    return check_source_name(name)


OutlierName = Annotated[str, AfterValidator(_known_source)]  # oodscale.outlier_sources


def _known_score(name: str) -> str:
    from oodscale.evaluate.score_table import check_score_name  # built-in and pood: names

    return check_score_name(name)


ScoreName = Annotated[str, AfterValidator(_known_score)]  # evaluate.score_table


def _known_backbone(name: str) -> str:
    from oodscale.classify.backbone_table import check_backbone

    return check_backbone(name)


BackboneName = Annotated[str, AfterValidator(_known_backbone)]  # classify.backbone_table


def _known_data_source(name: str) -> str:
    from oodscale.data.source_table import check_data_source

    return check_data_source(name)


DataSourceName = Annotated[str, AfterValidator(_known_data_source)]  # data.source_table


def _known_ood_set(name: str) -> str:
    from oodscale.data.ood_table import check_ood_set

    return check_ood_set(name)


def _known_validation_set(name: str) -> str:
    from oodscale.data.ood_table import check_ood_set

    return check_ood_set(name, validation=True)


BuiltinOOD = Annotated[str, AfterValidator(_known_ood_set)]  # data.ood_table
# built-in sets with a validation counterpart disjoint from the test images (data.ood_table)
ValidationOOD = Annotated[str, AfterValidator(_known_validation_set)]


def _yaml_no(value: Any) -> Any:
    """YAML 1.1 reads a bare `no` (mixed_precision: no, or =no on the command line) as False:
    take it as the "no" it was written as."""
    return "no" if value is False else value


# diffusers.optimization.SchedulerType's values (named here so the config needs no torch)
LRSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine",
                     "cosine_with_restarts", "polynomial"]
MixedPrecision = Annotated[Literal["no", "bf16", "fp16"], BeforeValidator(_yaml_no)]
SamplingPrecision = Annotated[Literal["auto", "no", "bf16"], BeforeValidator(_yaml_no)]
# Upper bounds: generous for ImageNet-scale runs, small enough that a typo (an extra 000, 1e12)
# is refused naming its key rather than building a billion-item list or allocating terabytes.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
ClassIndex = Annotated[int, Field(ge=0, le=1_000_000)]
MAX_BATCH = 65_536
MAX_WORKERS = 4_096
MAX_CPUS = 1_024.0
MAX_EPOCHS = 100_000
MAX_SAMPLES = 1_000_000_000  # images one set or one generation run may hold


def _no_credentials(location: str | None) -> str | None:
    from oodscale.uris import refuse_credentials

    return refuse_credentials(location)


def _no_credentials_in_address(address: str | None) -> str | None:
    from oodscale.uris import refuse_credentials

    return refuse_credentials(address, address=True)


# A path or URI that must not carry credentials (user info, secret query keys): oodscale.uris
Location = Annotated[str, AfterValidator(_no_credentials)]


class ConfigError(InputError):
    """A config that cannot run; the message names the key and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StorageConfig(_Section):
    root: Location = Field("runs", description="Local path, file://, s3:// or gs:// URI.")


class RayConfig(_Section):
    address: Annotated[str | None, AfterValidator(_no_credentials_in_address)] = Field(
        None, description="Cluster address; null = RAY_ADDRESS or local.")
    num_cpus: int | None = Field(
        None, ge=1, le=MAX_WORKERS * 16,
        description="Logical CPUs of a local Ray (default: max(4, 2 x cores)).")
    object_store_mb: int = Field(
        512, ge=64, le=4 << 20,
        description="Object store of a local Ray, in MB; a joined cluster keeps its own.")
    host: str = Field("127.0.0.1", min_length=1, description=(
        "The address a local Ray listens on: loopback (default), or this machine's address "
        "so that other machines can join it (refused while RAY_AUTH_MODE=disabled)."))


class OODSetSource(_Section):
    """A bring-your-own OOD test set: an ImageFolder tree or WebDataset shards."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$",
                      description="The set's name in data/ood/<name> and in the results.")
    path: Location = Field(description="Its directory: local path or URI.")
    format: Literal["imagefolder", "webdataset"] = Field(
        "imagefolder", description="imagefolder: image files at any depth; webdataset: "
                                   "<prefix>-*.tar shards.")
    group: Literal["near", "far"] = Field(
        "far", description="The report's near/far group; far unless said, as for most sets.")


class DataConfig(_Section):
    source: DataSourceName = Field(
        "digits", description="The ID data set: digits, embedded (no download), by default; "
                              "fashion_mnist, imagefolder and cifar10 are read from data.path "
                              "(oodscale/data/source_table.py).")
    path: Location | None = Field(
        None, description="Dataset root, for the sources that read one (required where the "
                          "source has no default; fashion_mnist's is Debian's "
                          "/usr/share/datasets/fashion-mnist).")
    image_size: int = Field(16, ge=8, le=512,
                            description="Side in pixels every ID and OOD image is resized to "
                                        "(square); the digits' own are 8x8.")
    channels: Literal[1, 3] = Field(1, description="1 = gray, 3 = RGB; images of other modes "
                                                   "are converted.")
    id_classes: list[ClassIndex] | None = Field(
        None, description="Keep only these classes as ID (open-set split); null = all.")
    test_fraction: float = Field(
        0.3, gt=0.0, lt=1.0,
        description="Share of the digits held out as the ID test split (stratified, drawn from "
                    "seed); the other sources have a test split of their own.")
    max_train_per_class: int | None = Field(
        None, ge=2, le=MAX_SAMPLES,
        description="Keep at most this many training images of each ID class "
                                "(fixed draw), to fit a benchmark to a machine; null = all.")
    max_test_per_class: int | None = Field(
        None, ge=1, le=MAX_SAMPLES, description="The same cap on the ID test images; null = all.")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Share of the training images held out as the ID validation split "
                    "(data/id/val; stratified, never trained on); 0 = none.")
    shard_size: int = Field(512, ge=1, le=1_000_000,
                            description="Images per WebDataset shard that prepare writes (ID "
                                        "and OOD sets).")
    max_image_mb: float = Field(
        64.0, gt=0.0, le=4096.0,
        description="A user's image file larger than this is refused before it is read "
                    "(prepare, --ood folders, predict).")
    max_image_megapixels: float = Field(
        40.0, gt=0.0, le=89.0,
        description="An image whose header says more pixels than this is refused before it is "
                    "decoded; 89 is Pillow's own decompression-bomb limit.")
    ood_sets: list[BuiltinOOD] = Field(
        default_factory=lambda: ["textures", "photos", "gaussian", "uniform", "rademacher",
                                 "blobs"],
        description="Built-in OOD test sets: what any source has without a download (openset "
                    "needs data.id_classes; digits is for sources other than digits).")
    ood_samples: int | None = Field(
        None, ge=8, le=10_000_000,
        description="A cap on the images of every built-in OOD test set; null = "
                    "every held-out image the data has (openset, digits) and "
                    "data.generated_ood_samples for the sets made here.")
    generated_ood_samples: int = Field(
        1000, ge=8, le=10_000_000,
        description="Images of each built-in OOD test set made here (crops of the "
                    "shipped textures and photos, noise) when ood_samples is unset.")
    val_ood_samples: int = Field(
        300, ge=8, le=10_000_000,
        description="Images of each OOD validation set (at most ood_samples, and at "
                    "most what its pool holds).")
    extra_ood: list[OODSetSource] = Field(
        default_factory=list, description="Bring-your-own OOD test sets (also --ood "
                                          "NAME=PATH[,webdataset][,near]).")
    near_ood: list[str] = Field(
        default_factory=lambda: ["openset"],
        description="Built-in sets reported as near-OOD, the rest far: openset by default, "
                    "held-out classes of the ID data itself.")
    val_ood_sets: list[ValidationOOD] | None = Field(
        None, description="OOD validation sets (data/ood-val/<name>) that choose each loss's "
                          "primary score; null = those of data.ood_sets that have one.")

    @property
    def val_set_size(self) -> int:
        """Images of each OOD validation set."""
        return min(self.val_ood_samples, self.ood_samples or self.val_ood_samples)

    def ood_set_size(self, name: str, purpose: str) -> int | None:
        """Images of a built-in OOD set (`ood` test or `ood-val`); None = every image its
        pool holds (sets of real images only)."""
        from oodscale.data.ood_table import OOD_SETS

        if purpose != "ood":
            return self.val_set_size
        if not OOD_SETS[name].made_here:
            return self.ood_samples
        return self.ood_samples or self.generated_ood_samples

    @property
    def validation_ood_sets(self) -> list[str]:
        """The OOD validation sets prepare writes and evaluate scores (never a test image);
        none without an ID validation split to score them against."""
        from oodscale.data.ood_table import OOD_SETS

        if self.val_fraction == 0:
            return []
        if self.val_ood_sets is not None:
            return list(self.val_ood_sets)
        return [n for n in self.ood_sets if OOD_SETS[n].validation]

    @model_validator(mode="after")
    def _paths_needed(self) -> DataConfig:
        from oodscale.data.ood_table import OOD_SETS
        from oodscale.data.source_table import DATA_SOURCES

        spec = DATA_SOURCES[self.source]
        if spec.needs_path and not self.path:
            raise ValueError(f"data.path is required when data.source={self.source!r}")
        if self.id_classes is not None and len(set(self.id_classes)) < 2:
            raise ValueError("data.id_classes needs at least two distinct classes")
        held_out = [n for n in self.ood_sets if OOD_SETS[n].held_out]
        if held_out and self.id_classes is None:
            raise ValueError(f"data.ood_sets contains {held_out[0]!r} but data.id_classes is "
                             f"unset: set data.id_classes to the ID classes (e.g. [0,1,2,3,4,5])")
        held_out = [n for n in self.val_ood_sets or [] if OOD_SETS[n].held_out]
        if held_out and self.id_classes is None:
            raise ValueError(f"data.val_ood_sets contains {held_out[0]!r} but data.id_classes "
                             f"is unset")
        if spec.same_as_ood in self.ood_sets:
            raise ValueError(f"the {spec.same_as_ood!r} OOD set is the ID data of "
                             f"data.source={self.source}: remove it from data.ood_sets")
        return self


class WorkerConfig(_Section):
    """How a Ray Train stage is spread: fractional CPUs keep 2-core machines from starving."""

    num_workers: int = Field(2, ge=1, le=MAX_WORKERS,
                             description="Ray Train workers (DDP ranks), one GPU each on GPU.")
    cpus_per_worker: float = Field(
        0.5, gt=0.0, le=MAX_CPUS,
        description="Logical CPUs each worker reserves; below 1 so that 2 cores are not "
                    "starved (DESIGN.md).")
    use_gpu: bool | None = Field(None, description="null = use GPUs when the cluster has them.")
    mixed_precision: MixedPrecision = Field(
        "no", description="Accelerate's mixed_precision: no (fp32), bf16 or fp16.")
    torch_threads: int | None = Field(
        None, ge=1, le=1_024,
        description="Torch CPU threads per worker; null = Ray's default (the worker's CPUs, at "
                    "least 1). On a small CPU-only machine a lone worker trains faster with all "
                    "cores.")
    cache_mb: float = Field(
        1024.0, ge=0.0, le=float(1 << 20),
        description="A dataset whose rows for one worker fit in this many MB (uint8) is read once "
                    "per run and kept on the worker's device; larger ones stream every pass.")


class DiffusionConfig(WorkerConfig):
    num_workers: int = Field(1, ge=1, le=MAX_WORKERS,
                             description="Ray Train workers (DDP ranks), one GPU each on GPU.")
    block_out_channels: list[int] = Field(
        default_factory=lambda: [32, 32],
        description="UNet channels per resolution level (multiples of 8): two levels, 16x16 "
                    "and 8x8 for the digits; the time embedding is 4x the first.")
    layers_per_block: int = Field(1, ge=1, le=16, description="ResNet layers per UNet block.")
    attention: bool = Field(False, description="Self-attention at the lowest resolution.")
    timesteps: int = Field(1000, ge=10, le=100_000,
                           description="Diffusion steps T of the cosine noise schedule (the "
                                       "DDPM paper's 1000).")
    p_uncond: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Probability a training label is replaced by the zero vector, which trains "
                    "the unconditional score classifier-free guidance needs.")
    epochs: int = Field(100, ge=1, le=MAX_EPOCHS,
                        description="Passes over the ID training split.")
    batch_size: int = Field(64, ge=1, le=MAX_BATCH, description="Images per worker per step.")
    lr: float = Field(2e-4, gt=0.0, le=10.0,
                      description="Peak AdamW learning rate (after the warm-up).")
    lr_schedule: LRSchedule = Field(
        "cosine", description="diffusers' get_scheduler name: the lr over the run's steps.")
    lr_warmup_steps: int = Field(
        100, ge=0, le=100_000_000,
        description="Optimiser steps of linear lr warm-up from 0 (every schedule but "
                    "constant uses it).")
    ema_decay: float = Field(
        0.999, ge=0.0, lt=1.0,
        description="Largest decay of the EMA of the weights (diffusers' EMAModel) that samples "
                    "are drawn from and that train-diffusion publishes; 0 = no EMA (the raw "
                    "weights are published).")
    ema_warmup_power: float | None = Field(
        0.75, gt=0.0, le=10.0,
        description="EMA warm-up: the decay at step n is min(ema_decay, 1 - (1 + n)^-power) "
                    "(EMAModel's use_ema_warmup with inv_gamma 1), so early steps average "
                    "over few weights; null = EMAModel's (1 + n)/(10 + n) ramp.")
    quality_per_class: int = Field(
        32, ge=0, le=100_000,
        description="Sample quality in the card (model.json, diffusion/quality.py): this many "
                    "class-conditional samples per class and as many label-mixup ones, read by "
                    "the run's reference classifier (<run>/reference, trained on the ID "
                    "training split); 0 = not measured.")

    @field_validator("block_out_channels")
    @classmethod
    def _channels(cls, v: list[int]) -> list[int]:
        if not v or any(c < 8 or c % 8 for c in v):
            raise ValueError("each entry must be a multiple of 8 (GroupNorm groups), at least one")
        if len(v) > 8 or max(v) > 8192:
            raise ValueError("at most 8 entries, each at most 8192 channels")
        return v


class LambdaConfig(_Section):
    """Distribution of the label-mixup weight lambda."""

    kind: Literal["fixed", "uniform", "beta"] = Field(
        "fixed", description="fixed (lam.value), uniform on [lam.low, lam.high], or "
                             "Beta(lam.alpha, lam.alpha).")
    value: float = Field(0.5, ge=0.0, le=1.0,
                         description="lambda of kind fixed: 0.5 is midway between the classes.")
    low: float = Field(0.3, ge=0.0, le=1.0, description="Lower end of kind uniform.")
    high: float = Field(0.7, ge=0.0, le=1.0, description="Upper end of kind uniform.")
    alpha: float = Field(2.0, gt=0.0, le=1000.0,
                         description="Both shapes of kind beta (symmetric about 0.5).")

    @model_validator(mode="after")
    def _interval(self) -> LambdaConfig:
        if self.kind == "uniform" and self.low > self.high:
            raise ValueError("generate.lam.low must be <= generate.lam.high")
        return self


class GenerateConfig(_Section):
    generator: str = Field("ddpm", description="ddpm (trained by train-diffusion) or dit (a "
                                               "pretrained DiT + VAE); see "
                                               "oodscale/diffusion/generators.py")
    pretrained: str | None = Field(
        None, description="A pretrained generator's weights: a local directory in diffusers' "
                          "save_pretrained layout (transformer/, vae/) or a hub id.")
    class_list: str | None = Field(
        None, description="File of the generator's class names in index order, one per line "
                          "(first word; ImageNet: LOC_synset_mapping.txt gives the wnids); "
                          "null = the pipeline's id2label. ID classes map to these by name.")
    image_format: Literal["png", "jpg"] = Field(
        "png", description="How synthetic images are stored: png (lossless) or jpg (about 10x "
                           "smaller for 224x224 photos).")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of image_format=jpg.")
    num_shards: int = Field(4, ge=1, le=1_000_000,
                            description="Shards of one generation run (the rows the sampling "
                                        "actors share out).")
    samples_per_shard: int = Field(256, ge=1, le=1_000_000,
                                   description="Outliers per shard (4 x 256 = 1,024 in all by "
                                               "default).")
    lam: LambdaConfig = Field(default_factory=LambdaConfig,
                              description="Distribution of the label-mixup weight lambda.")
    mode: Literal["mix", "sum", "composed"] = Field(
        "mix", description="Label-mixup condition: mix (y = λ·e_a + (1−λ)·e_b), sum "
                           "(y = e_a + e_b), composed (Composable Diffusion: the guidance of "
                           "e_a and e_b weighted λ and 1−λ; one more denoiser batch per step).")
    guidance: float = Field(
        3.0, ge=0.0, le=100.0,
        description="Classifier-free guidance scale w (1 = plain conditional); in a digits "
                    "test 3 turned the OE term from harmful at 1 to helpful (DESIGN.md).")
    sampler: str = Field("ddim", description="ddim, ddpm or dpmsolver (DPM-Solver++, 15-25 "
                                             "steps); see oodscale/diffusion/samplers.py")
    steps: int = Field(50, ge=1, le=100_000, description="Sampler steps (capped at "
                                                         "diffusion.timesteps).")
    mixed_precision: SamplingPrecision = Field(
        "auto", description="Sampling precision: auto = bf16 where the device computes it "
                            "natively (GPUs, CPUs with AVX-512 BF16 or AMX), fp32 elsewhere.")
    batch_size: int = Field(256, ge=1, le=MAX_BATCH,
                            description="Images each sampling actor denoises at once.")
    concurrency: int = Field(2, ge=1, le=MAX_WORKERS,
                             description="Sampling actors (Ray Data), one GPU each on GPU.")
    cpus_per_actor: float = Field(
        0.5, gt=0.0, le=MAX_CPUS,
        description="Logical CPUs each actor reserves; below 1 so that 2 cores are not starved.")
    use_gpu: bool | None = Field(None, description="null = use GPUs when the cluster has them.")
    grid_per_class: int = Field(
        6, ge=1, le=1_000,
        description="Samples per class (at most 10 classes) in the preview grid, beside as many "
                    "label-mixup ones.")
    quality_samples: int = Field(
        1000, ge=0, le=1_000_000,
        description="How between their two classes the drawn outliers are (mass on a and b, "
                    "entropy), read by the run's reference classifier on this many of them "
                    "and recorded in the shards' manifest and the report; 0 = not measured.")
    filter_tau: float = Field(
        0.9, gt=0.0, le=1.0,
        description="The ambiguity filter of the -filtered outlier sources: a sample a plain "
                    "ID classifier gives MSP > tau is dropped.")

    @field_validator("sampler", "generator")
    @classmethod
    def _in_table(cls, v: str, info: ValidationInfo) -> str:
        from oodscale.diffusion.generators import GENERATORS
        from oodscale.diffusion.samplers import SAMPLERS

        table = {"sampler": SAMPLERS, "generator": GENERATORS}[info.field_name]
        if v not in table:
            raise ValueError(f"unknown {info.field_name} {v!r}; valid: {', '.join(table)}")
        return v

    @model_validator(mode="after")
    def _weights_given(self) -> GenerateConfig:
        from oodscale.diffusion.generators import GENERATORS

        if not GENERATORS[self.generator].trained_here and not self.pretrained:
            raise ValueError(f"generate.generator={self.generator} is pretrained: set "
                             f"generate.pretrained to its directory or hub id")
        if self.num_shards * self.samples_per_shard > MAX_SAMPLES:
            raise ValueError(f"generate.num_shards x generate.samples_per_shard = "
                             f"{self.num_shards * self.samples_per_shard:,} samples, above the "
                             f"{MAX_SAMPLES:,} one generation run may draw")
        return self


class AugmentConfig(_Section):
    """Classifier augmentation, on the device in the training step, for ID images and
    outliers alike (oodscale/classify/augment.py). Both off by default."""

    crop_padding: int = Field(
        0, ge=0, le=256,
        description="Random crop: shift each image by up to this many pixels each way "
                    "(reflected border), e.g. 4 at 32x32, 2 at 16x16; 0 = none.")
    flip: bool = Field(
        False, description="Random horizontal flip (p = 1/2); only where a mirror image is "
                           "still its class (not for digits).")


class CellGroup(_Section):
    """More grid cells beside the main product, e.g. an outlier-source ablation for two losses."""

    losses: list[LossName] = Field(min_length=1, description="Loss heads of this group.")
    outliers: list[OutlierName] = Field(min_length=1,
                                        description="Outlier sources of this group.")

class TrainConfig(WorkerConfig):
    losses: list[LossName] = Field(
        default_factory=lambda: ["softmax", "arcface"],
        description="Loss heads, names of classify/loss_table.py: softmax (the baseline) and "
                    "arcface (the paper's metric head) by default.")
    outliers: list[OutlierName] = Field(
        default_factory=lambda: ["none", "labelmix"],
        description="none, noise, pixelmix, labelmix, labelmix-w<g>, each labelmix -filtered "
                    "and +noise / +pixelmix (half each).")
    seeds: list[Seed] = Field(
        default_factory=lambda: [0, 1, 2], max_length=1_000,
        description="Seeds of every cell (initial weights, batch order); three give the "
                    "intervals over seeds.")
    extra_cells: list[CellGroup] = Field(
        default_factory=list, description="Cells beyond losses x outliers, each group its own "
                                          "losses x outliers, all at train.seeds.")
    backbone: BackboneName = Field(
        "smallcnn", description="A name of classify/backbone_table.py; smallcnn is sized for "
                                "small images such as the digits.")
    embedding_dim: int = Field(64, ge=2, le=65_536,
                               description="Width D of the embedding the head reads.")
    head_options: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {"arcface": {"margin": 28.6, "scale": 16.0},
                                 "cosface": {"margin": 0.2, "scale": 16.0},
                                 "sphereface": {"margin": 2.0, "scale": 1.0}},
        description="Per-loss constructor options in pytorch-metric-learning's units (arcface's "
                    "margin in degrees); scale 16, not pml's 64, keeps MSP from saturating.")
    epochs: int = Field(15, ge=1, le=MAX_EPOCHS, description="Epochs of every cell.")
    steps_per_epoch: int | None = Field(None, ge=1, le=100_000_000,
                                        description="null = one pass over ID data.")
    batch_size: int = Field(64, ge=2, le=MAX_BATCH, description="ID images per worker per step.")
    outlier_batch_size: int = Field(64, ge=1, le=MAX_BATCH,
                                    description="Outliers per worker per step.")
    lr: float = Field(1e-3, gt=0.0, le=10.0,
                      description="Peak AdamW learning rate of the one-cycle schedule.")
    finetune_epochs: int = Field(
        5, ge=1, le=MAX_EPOCHS,
        description="Epochs of a -ft cell (e.g. labelmix-ft): OE fine-tuning of the finished "
                    "none cell of its loss and seed, as the OE paper does, instead of OE "
                    "training from scratch.")
    finetune_lr: float | None = Field(
        None, gt=0.0, le=10.0,
        description="Peak lr of a -ft cell's fine-tuning (one-cycle, as training); null = "
                    "train.lr / 10.")
    weight_decay: float = Field(5e-4, ge=0.0, le=10.0, description="AdamW weight decay.")
    lambda_oe: float = Field(
        0.5, ge=0.0, le=1000.0,
        description="Weight of the OE term KL(U || p(.|x_out)) beside the ID loss; 0.5 as in "
                    "Hendrycks et al.'s OE.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig,
                                   description="Augmentation of ID images and outliers.")
    init_checkpoint: str | None = Field(
        None, description="A local torchvision ResNet checkpoint (safetensors, or a weights-only "
                          "torch file) to fine-tune from; resnet18/resnet50 above 64x64 only.")

    @model_validator(mode="after")
    def _init_fits(self) -> TrainConfig:
        from oodscale.classify.backbone_table import BACKBONES

        if self.init_checkpoint and not BACKBONES[self.backbone].torchvision_init:
            able = ", ".join(n for n, spec in BACKBONES.items() if spec.torchvision_init)
            raise ValueError(f"train.init_checkpoint loads torchvision ResNets; "
                             f"train.backbone={self.backbone} is not one ({able})")
        return self

    @model_validator(mode="after")
    def _finetuned_cells_have_their_start(self) -> TrainConfig:
        from oodscale.outlier_sources import FINETUNE

        lonely = [f"{loss}-{o}" for loss, o in self.cells
                  if o.endswith(FINETUNE) and (loss, "none") not in self.cells]
        if lonely:
            raise ValueError(f"cells {lonely} fine-tune the none cell of their loss, which the "
                             f"grid lacks: add none to train.outliers (or to their "
                             f"train.extra_cells group)")
        return self

    @field_validator("losses", "outliers", "seeds")
    @classmethod
    def _non_empty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("must list at least one entry")
        return v
    @property
    def cells(self) -> list[tuple[str, str]]:
        """Every (loss, outlier source) pair of the grid, main product first, no repeats."""
        pairs = [(lo, o) for lo in self.losses for o in self.outliers]
        pairs += [(lo, o) for g in self.extra_cells for lo in g.losses for o in g.outliers]
        return list(dict.fromkeys(pairs))

    @property
    def outlier_sources(self) -> list[str]:
        """Every outlier source some cell trains with (what generate must draw)."""
        return list(dict.fromkeys(o for _, o in self.cells))

    @field_validator("head_options")
    @classmethod
    def _known_head_options(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        from oodscale.classify.loss_table import check_loss_options

        for name, options in v.items():
            check_loss_options(name, options)
            big = {k: x for k, x in options.items() if abs(x) > 1e6}
            if big:
                raise ValueError(f"{name} options {big}: each value must be within +-1e6")
        return v


class EvaluateConfig(_Section):
    scores: list[ScoreName] = Field(
        default_factory=lambda: ["msp", "maxlogit", "energy", "maxcos"],
        description="Scores to report, names of evaluate/score_table.py or pood:<Name>; the "
                    "default four read the head's output and fit nothing on training features.")
    batch_size: int = Field(512, ge=1, le=MAX_BATCH, description="Images per scoring batch.")
    concurrency: int = Field(1, ge=1, le=MAX_WORKERS,
                             description="Scoring actors (Ray Data), one GPU each on GPU.")
    cpus_per_actor: float = Field(
        0.5, gt=0.0, le=MAX_CPUS,
        description="Logical CPUs each actor reserves; below 1 so that 2 cores are not starved.")
    use_gpu: bool | None = Field(None, description="null = use GPUs when the cluster has them.")
    bootstrap: int = Field(
        1000, ge=100, le=100_000,
        description="Bootstrap draws (over seeds and test images) behind every paired 95 % "
                    "interval in the report, comparisons.parquet and claims.parquet.")


class DetectorConfig(_Section):
    """The yes/no detector (`oodscale predict`, `oodscale.Detector`): its default score and the
    share of ID validation images its threshold accepts (`oodscale calibrate` sets it)."""

    score: ScoreName = Field(
        "energy", description="The score predict and Detector use unless told: energy reads "
                              "softmax and metric heads alike.")
    tpr: float = Field(0.95, gt=0.0, lt=1.0,
                       description="Share of ID validation images the threshold accepts (the "
                                   "TPR of FPR@95TPR).")


class TrackingConfig(_Section):
    """Optional MLflow tracking (oodscale.tracking); needs `pip install 'oodscale[mlflow]'`."""

    mlflow_uri: Location | None = Field(
        None, description="MLflow tracking URI (file:/path works offline, or http://host:5000); "
                          "null = no tracking.")
    experiment: str | None = Field(None, description="MLflow experiment; null = the config name.")


class ExperimentConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$",
                      description="The experiment: its directory under storage.root; a YAML "
                                  "file's stem unless set.")
    seed: Seed = Field(0, description="Run seed: data splits, shard seeds, sample grids.")
    storage: StorageConfig = Field(default_factory=StorageConfig,
                                   description="Where every stage reads and writes.")
    ray: RayConfig = Field(default_factory=RayConfig, description="The Ray a stage runs on.")
    data: DataConfig = Field(default_factory=DataConfig,
                             description="ID data and OOD test and validation sets (prepare).")
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig,
                                       description="The soft-label DDPM (train-diffusion).")
    generate: GenerateConfig = Field(default_factory=GenerateConfig,
                                     description="Label-mixup outliers (generate).")
    train: TrainConfig = Field(default_factory=TrainConfig,
                               description="The classifier grid (train).")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig,
                                     description="Scoring and the report (evaluate).")
    detector: DetectorConfig = Field(default_factory=DetectorConfig,
                                     description="The yes/no detector (calibrate, predict).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig,
                                     description="Optional MLflow tracking.")

    @model_validator(mode="after")
    def _flips_valid(self) -> ExperimentConfig:
        from oodscale.data.source_table import DATA_SOURCES

        if self.train.augment.flip and not DATA_SOURCES[self.data.source].mirror_safe:
            raise ValueError(f"train.augment.flip mirrors images, and a mirrored "
                             f"{self.data.source} image is not its class (a 2 is no longer a "
                             f"2): set train.augment.flip=false")
        return self

    @property
    def num_classes(self) -> int:
        """Number of ID classes the classifier and the DDPM are conditioned on."""
        if self.data.id_classes is not None:
            return len(self.data.id_classes)
        from oodscale.data.source_table import DATA_SOURCES

        return DATA_SOURCES[self.data.source].num_classes or 0  # 0: the data will tell


def parse_ood_flag(text: str) -> OODSetSource:
    """`NAME=PATH[,webdataset][,near]` (the `--ood` flag) → a bring-your-own OOD set."""
    name, sep, rest = text.partition("=")
    parts = rest.split(",")
    options = set(parts[1:])
    unknown = options - {"webdataset", "imagefolder", "near", "far"}
    if not sep or not name or not parts[0] or unknown:
        raise ConfigError(f"--ood {text!r}: expected NAME=PATH with optional ,webdataset and "
                          f",near (e.g. --ood mine=/data/ood,near)")
    try:
        return OODSetSource(name=name, path=parts[0],
                            format="webdataset" if "webdataset" in options else "imagefolder",
                            group="near" if "near" in options else "far")
    except ValidationError as err:
        raise ConfigError(f"--ood {text!r}: {_format_errors(err)}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:depth + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Turn `a.b=value` strings into (key, YAML-typed value) pairs."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        pairs.append((key, yaml.safe_load(raw) if raw else None))
    return pairs


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against configs/digits.yaml)"
        lines.append(f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def build_config(tree: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """Validate a config tree after applying dotted overrides."""
    tree = dict(tree)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None,
                extra_ood: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment; its file stem is the experiment name unless `name` is set.

    `extra_ood` holds `--ood NAME=PATH[,webdataset][,near]` flags, appended to data.extra_ood.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (try configs/digits.yaml)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree)}")
    tree.setdefault("name", path.stem)
    cfg = build_config(tree, overrides)
    added = [parse_ood_flag(text) for text in extra_ood or []]
    if added:
        cfg.data.extra_ood = [*cfg.data.extra_ood, *added]
    names = [s.name for s in cfg.data.extra_ood] + list(cfg.data.ood_sets)
    duplicate = sorted({n for n in names if names.count(n) > 1})
    if duplicate:
        raise ConfigError(f"OOD set name(s) {duplicate} used twice in data.ood_sets / "
                          f"data.extra_ood / --ood; give each set its own name")
    return cfg


def steps_per_epoch(num_samples: int, batch_size: int, num_workers: int) -> int:
    """Fixed step count per epoch so every DDP rank takes the same number of steps."""
    return max(1, math.floor(num_samples / (batch_size * num_workers)))
