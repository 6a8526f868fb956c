"""Sampling the DDPM: classifier-free guidance, DDPM or DDIM, and the Ray Data shard writer.

`ShardSampler` is a Ray Data callable class: it loads the model once per actor; its rows are
shard indices and each call draws and writes whole shards. Shard i is drawn from
seed hash(run seed, i) alone, so a rerun skips shards in the manifest and a resumed run equals
an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from oodscale.config import GenerateConfig
from oodscale.data.shards import shard_name, write_shard
from oodscale.data.streams import from_model_output
from oodscale.devices import worker_device
from oodscale.diffusion.mixup import distinct_pairs, mixup_labels, sample_lambdas
from oodscale.diffusion.model import LabelConditionedUNet, load_unet
from oodscale.diffusion.samplers import make_sampler
from oodscale.runtime import derive_seed, open_storage


def sampling_autocast(device: torch.device):
    """bf16 autocast on GPU workers (the scale-out setting); plain fp32 on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def sample_images(model: LabelConditionedUNet, labels: torch.Tensor, guidance: float,
                  scheduler, generator: torch.Generator, device: torch.device | str = "cpu",
                  ) -> torch.Tensor:
    """Images (B×C×H×W in [-1, 1]) for soft labels; eps = eps_u + w·(eps_c − eps_u)."""
    cfg = model.config
    shape = (len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = torch.randn(shape, generator=generator).to(device)
    labels = labels.to(device)
    null = torch.zeros_like(labels)
    for t in scheduler.timesteps:
        tt = torch.full((len(x),), int(t), device=device, dtype=torch.long)
        if guidance == 1.0:
            eps = model(x, tt, labels).float()
        else:
            both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
            eps_c, eps_u = both.float().chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x.clamp(-1, 1)


def draw_labelmix(model: LabelConditionedUNet, gen: GenerateConfig, timesteps: int, seed: int,
                  count: int, device: torch.device | str = "cpu",
                  ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """`count` label-mixup outliers from `seed` alone, with their provenance minus the model."""
    rng = np.random.default_rng(seed)
    num_classes = model.config.num_classes
    a, b = distinct_pairs(rng, count, num_classes)
    lam = sample_lambdas(rng, count, gen.lam)
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, count, gen.batch_size):
        part = slice(start, min(start + gen.batch_size, count))
        y = mixup_labels(a[part], b[part], lam[part], num_classes, gen.mode)
        scheduler = make_sampler(gen.sampler, timesteps, gen.steps)
        images.append(from_model_output(
            sample_images(model, y, gen.guidance, scheduler, generator, device)))
    metas = [{"a": int(a[i]), "b": int(b[i]),
              "lam": None if gen.mode == "sum" else float(lam[i]),
              "guidance": gen.guidance, "seed": seed, "index": i} for i in range(count)]
    return np.concatenate(images), metas


class ShardSampler:
    """Ray Data callable class: model loaded once per actor, writes whole synthetic shards."""

    def __init__(self, storage_root: str, model_dir: str, out_dir: str, gen: dict[str, Any],
                 timesteps: int, run_seed: int, model_hash: str, use_gpu: bool):
        self.storage = open_storage(storage_root)
        self.device = worker_device(use_gpu)
        self.model = load_unet(self.storage, model_dir).to(self.device)
        self.gen = GenerateConfig.model_validate(gen)
        self.out_dir, self.timesteps = out_dir, timesteps
        self.run_seed, self.model_hash = run_seed, model_hash

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"shard": [], "path": [], "count": [], "sha256": [],
                                     "size": []}
        for index in batch["shard"].tolist():
            seed = shard_seed(self.run_seed, index)
            with sampling_autocast(self.device):
                images, metas = draw_labelmix(self.model, self.gen, self.timesteps, seed,
                                              self.gen.samples_per_shard, self.device)
            samples = ((f"syn{index:06d}_{i:06d}", images[i], {**m, "model": self.model_hash})
                       for i, m in enumerate(metas))
            info = write_shard(self.storage, self.out_dir, shard_name("synthetic", index), samples)
            for key, value in (("shard", index), ("path", info.path), ("count", info.count),
                               ("sha256", info.sha256), ("size", info.size)):
                out[key].append(value)
        return out


def shard_seed(run_seed: int, index: int) -> int:
    """The seed that alone determines synthetic shard `index` of a run."""
    return derive_seed(run_seed, "synthetic", index)
