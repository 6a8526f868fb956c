"""The train-diffusion stage: the class-conditional DDPM in a Ray Train TorchTrainer.

One-hot labels, replaced by the zero vector with probability p_uncond so the same network also
learns the unconditional score that classifier-free guidance needs.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from oodscale import tracking
from oodscale.config import ExperimentConfig, steps_per_epoch
from oodscale.data.shards import Manifest
from oodscale.data.streams import to_model_input, training_set, worker_data
from oodscale.diffusion.generators import MODEL_CARD, content_hash
from oodscale.diffusion.mixup import one_hot
from oodscale.diffusion.model import LabelConditionedUNet, UNetGenerator
from oodscale.distributed import (
    copy_checkpoint,
    make_worker_accelerator,
    prepare,
    report,
    resumed_state,
    run_trainer,
)
from oodscale.progress import epoch_progress
from oodscale.runtime import RunLayout, derive_seed, seed_everything


def build_unet(cfg: ExperimentConfig, manifest: Manifest) -> LabelConditionedUNet:
    d = cfg.diffusion
    return LabelConditionedUNet(
        num_classes=len(manifest.class_names), sample_size=manifest.image_size,
        in_channels=manifest.channels, block_out_channels=tuple(d.block_out_channels),
        layers_per_block=d.layers_per_block, attention=d.attention)


def make_scheduler(timesteps: int):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2")


def diffusion_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop: noise-prediction MSE on streamed ID shards."""
    import ray.train

    cfg = ExperimentConfig.model_validate(config["cfg"])
    manifest = Manifest.from_json(config["manifest"])
    d = cfg.diffusion
    ctx = ray.train.get_context()
    seed_everything(derive_seed(cfg.seed, "diffusion", ctx.get_world_rank()))
    accelerator = make_worker_accelerator(d, config["use_gpu"])
    model = build_unet(cfg, manifest)
    optimizer = torch.optim.AdamW(model.parameters(), lr=d.lr, weight_decay=0.0)
    start_epoch = 0
    with resumed_state() as (ckpt, state):
        if ckpt is not None:
            model = LabelConditionedUNet.from_pretrained(ckpt)
            optimizer = torch.optim.AdamW(model.parameters(), lr=d.lr, weight_decay=0.0)
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            start_epoch = state["epoch"] + 1
    model, optimizer = prepare(accelerator, model, optimizer)
    scheduler = make_scheduler(d.timesteps)
    num_classes = len(manifest.class_names)
    device = accelerator.device
    batches = worker_data(config, device)["id"].batches(
        d.batch_size, derive_seed(cfg.seed, "diffusion-batches", ctx.get_world_rank()))
    steps = config["steps_per_epoch"]
    for epoch in range(start_epoch, d.epochs):
        model.train()
        total, started = torch.zeros((), device=device), time.time()
        for _ in range(steps):
            batch = next(batches)
            x = to_model_input(batch["image"])
            y = one_hot(batch["label"], num_classes, check=False)  # checked when read
            keep = (torch.rand(len(y), 1, device=device) >= d.p_uncond).float()
            noise = torch.randn_like(x)
            t = torch.randint(0, d.timesteps, (len(x),), device=device)
            with accelerator.autocast():
                pred = model(scheduler.add_noise(x, noise, t), t, y * keep)
                loss = torch.nn.functional.mse_loss(pred.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            total += loss.detach()  # summed on the device, read once per epoch
        metrics = {"epoch": epoch, "loss": total.item() / steps,
                   "images_per_s": steps * d.batch_size / (time.time() - started)}
        last = epoch == d.epochs - 1
        if last or (epoch + 1) % config["checkpoint_every"] == 0:
            unwrapped = accelerator.unwrap_model(model)

            def write(path: Path, unwrapped=unwrapped) -> None:
                unwrapped.save_pretrained(path, safe_serialization=True)
                torch.save(optimizer.state_dict(), path / "optimizer.pt")

            report(metrics, accelerator, write)
        else:
            report(metrics, accelerator, None)


def train_diffusion(cfg: ExperimentConfig, layout: RunLayout) -> dict[str, Any]:
    """Train (or resume) the DDPM and publish it under `<run>/diffusion`; returns its card."""
    storage = layout.storage
    card_path = f"{layout.diffusion_dir}/{MODEL_CARD}"
    if storage.exists(card_path):
        return UNetGenerator.model_card(cfg, layout)  # refuses a pretrained generator's card
    d = cfg.diffusion
    dataset, manifest = training_set(storage, layout.id_split("train"), d.num_workers, d.cache_mb)
    steps = steps_per_epoch(manifest.num_samples, d.batch_size, d.num_workers)
    with epoch_progress("train-diffusion", 1, d.epochs, tracking.epoch_logger()):
        result = run_trainer(
            diffusion_loop,
            {"cfg": cfg.model_dump(), "manifest": manifest.to_json(), "steps_per_epoch": steps,
             "checkpoint_every": max(1, d.epochs // 4)},
            {"id": dataset}, d, layout, name=f"{cfg.name}-diffusion")
    unet_dir = f"{layout.diffusion_dir}/unet"
    copy_checkpoint(result, layout, unet_dir)
    card = {"generator": "ddpm", "epochs": d.epochs, "final_loss": result.metrics.get("loss"),
            "images_per_s": result.metrics.get("images_per_s"),
            "num_classes": len(manifest.class_names), "class_names": manifest.class_names,
            "image_size": manifest.image_size, "channels": manifest.channels,
            "timesteps": d.timesteps, "model_hash": _hash_remote(layout, unet_dir)}
    storage.write_bytes_atomic(card_path, json.dumps(card, indent=2).encode())
    return card


def _hash_remote(layout: RunLayout, unet_dir: str) -> str:
    """Content hash of the saved weights, wherever they live."""
    with tempfile.TemporaryDirectory() as tmp:
        return content_hash(layout.storage.fetch_dir(unet_dir, Path(tmp)))
