"""Sampling any generator: classifier-free guidance, the samplers table, and the shard writer.

`ShardSampler` is a Ray Data callable class: it loads the generator once per actor; its rows are
shard indices and each call draws, decodes (a latent generator's VAE runs in the same actor),
resizes to the configured size and writes whole shards. Shard i is drawn from seed
hash(run seed, i) alone, so a rerun skips shards in the manifest and a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oodscale.config import GenerateConfig
from oodscale.data.shards import shard_name, write_shard
from oodscale.data.streams import from_model_output
from oodscale.devices import computes_bf16_natively, worker_device
from oodscale.diffusion.classmap import to_generator_labels
from oodscale.diffusion.generators import Generator, load_generator
from oodscale.diffusion.mixup import distinct_pairs, mixup_conditions, sample_lambdas
from oodscale.diffusion.samplers import make_sampler
from oodscale.runtime import derive_seed, open_storage


def sampling_autocast(device: torch.device, mixed_precision: str = "auto"):
    """bf16 autocast as `generate.mixed_precision` says; "auto" wherever the device computes
    bf16 natively (GPUs; CPUs with AVX-512 BF16 or AMX, where the digits UNet samples 2.1x
    faster than in fp32), fp32 elsewhere. Sampling only: bf16 moves a pixel by ~0.006 on
    average, a sixtieth of what other initial noise moves it (docs/benchmarks.md)."""
    enabled = mixed_precision == "bf16" or (mixed_precision == "auto"
                                            and computes_bf16_natively(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def scheduler_for(model: Generator, gen: GenerateConfig):
    """A fresh scheduler of the configured sampler on the generator's own noise schedule."""
    schedule = model.schedule
    return make_sampler(gen.sampler, schedule.pop("timesteps"), gen.steps, **schedule)


@torch.no_grad()
def sample_images(model: Generator, labels: torch.Tensor, guidance: float, scheduler,
                  generator: torch.Generator, device: torch.device | str = "cpu",
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B×C×H×W in [-1, 1]) for soft labels over the generator's classes.

    `labels` B×C: classifier-free guidance, ε = ε_u + w·(ε_c − ε_u), ε_u under the generator's
    unconditional input. `labels` B×K×C with `weights` B×K: composed guidance over K
    conditions, ε = ε_u + w·Σ_k weights_k·(ε_k − ε_u) (`mixup.mixup_conditions`)."""
    if labels.dim() == 2:
        labels, weights = labels[:, None], None
    count, parts = labels.shape[:2]
    x = torch.randn((count, *model.latent_shape), generator=generator).to(device)
    # condition k of every sample is block k of one batch: rows k·B … (k+1)·B − 1
    condition = model.condition(labels.transpose(0, 1).flatten(0, 1)).to(device)
    plain = guidance == 1.0 and parts == 1
    null = None if plain else model.null_condition(count).to(device)
    if weights is not None:
        weights = weights.to(device=device, dtype=torch.float32)
    for t in scheduler.timesteps:
        tt = torch.full((count,), int(t), device=device, dtype=torch.long)
        if plain:
            eps = model.predict_noise(x, tt, condition).float()
        else:
            # The first condition and the unconditional input go through in the batch plain
            # guidance uses ([c; u], 2B rows): a kernel's result can depend on the batch shape,
            # and so composed guidance with weights (1, 0) equals class a's guided output bit
            # for bit. The other conditions follow in one batch of their own.
            first = model.predict_noise(torch.cat([x, x]), tt.repeat(2),
                                        torch.cat([condition[:count], null]))
            eps_first, eps_u = first.float().chunk(2)
            eps_k = [eps_first]
            if parts > 1:
                rest = model.predict_noise(torch.cat([x] * (parts - 1)), tt.repeat(parts - 1),
                                           condition[count:])
                eps_k += list(rest.float().chunk(parts - 1))
            eps = eps_u + guidance * _composed(eps_k, eps_u, weights)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return model.decode(x).float().clamp(-1, 1)


def _composed(eps_k: list[torch.Tensor], eps_u: torch.Tensor,
              weights: torch.Tensor | None) -> torch.Tensor:
    """Σ_k weights_k·(ε_k − ε_u); one condition without weights: ε_c − ε_u."""
    if weights is None:
        return eps_k[0] - eps_u
    view = (-1,) + (1,) * (eps_u.dim() - 1)
    total = weights[:, 0].view(view) * (eps_k[0] - eps_u)
    for k in range(1, len(eps_k)):
        total = total + weights[:, k].view(view) * (eps_k[k] - eps_u)
    return total


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Decoded images at the configured size (antialiased), e.g. a DiT's 256 → 224."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp(-1, 1)


def draw_labelmix(model: Generator, gen: GenerateConfig, class_map: list[int], seed: int,
                  count: int, device: torch.device | str = "cpu", size: int | None = None,
                  ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """`count` label-mixup outliers from `seed` alone, with their provenance minus the model.

    Pairs (a, b) are ID classes; `class_map[k]` is ID class k's index among the generator's.
    """
    rng = np.random.default_rng(seed)
    num_classes = len(class_map)
    a, b = distinct_pairs(rng, count, num_classes)
    lam = sample_lambdas(rng, count, gen.lam)
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, count, gen.batch_size):
        part = slice(start, min(start + gen.batch_size, count))
        labels, weights = mixup_conditions(a[part], b[part], lam[part], num_classes, gen.mode)
        y = to_generator_labels(labels.flatten(0, 1), class_map,
                                model.num_classes).unflatten(0, labels.shape[:2])
        drawn = sample_images(model, y, gen.guidance, scheduler_for(model, gen), generator,
                              device, weights)
        images.append(from_model_output(resize_images(drawn, size or model.image_size)))
    metas = [{"a": int(a[i]), "b": int(b[i]),
              "lam": None if gen.mode == "sum" else float(lam[i]),
              "guidance": gen.guidance, "seed": seed, "index": i} for i in range(count)]
    return np.concatenate(images), metas


class ShardSampler:
    """Ray Data callable class: generator loaded once per actor, writes whole synthetic
    shards (PNG or JPEG, as generate.image_format says)."""

    def __init__(self, storage_root: str, diffusion_dir: str, out_dir: str, gen: dict[str, Any],
                 card: dict[str, Any], class_map: list[int], image_size: int, run_seed: int,
                 use_gpu: bool):
        self.storage = open_storage(storage_root)
        self.device = worker_device(use_gpu)
        self.model = load_generator(self.storage, diffusion_dir, card).to(self.device)
        self.gen = GenerateConfig.model_validate(gen)
        self.out_dir, self.class_map, self.image_size = out_dir, class_map, image_size
        self.run_seed, self.model_hash = run_seed, card["model_hash"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"shard": [], "path": [], "count": [], "sha256": [],
                                     "size": []}
        for index in batch["shard"].tolist():
            seed = shard_seed(self.run_seed, index)
            with sampling_autocast(self.device, self.gen.mixed_precision):
                images, metas = draw_labelmix(self.model, self.gen, self.class_map, seed,
                                              self.gen.samples_per_shard, self.device,
                                              self.image_size)
            samples = ((f"syn{index:06d}_{i:06d}", images[i], {**m, "model": self.model_hash})
                       for i, m in enumerate(metas))
            info = write_shard(self.storage, self.out_dir, shard_name("synthetic", index),
                               samples, self.gen.image_format, self.gen.jpeg_quality)
            for key, value in (("shard", index), ("path", info.path), ("count", info.count),
                               ("sha256", info.sha256), ("size", info.size)):
                out[key].append(value)
        return out


def shard_seed(run_seed: int, index: int) -> int:
    """The seed that alone determines synthetic shard `index` of a run."""
    return derive_seed(run_seed, "synthetic", index)
