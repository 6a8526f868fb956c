"""The train-diffusion stage: the config's generator, where it is one trained here (its
table row names the model; the DDPM's is the UNet), in a Ray Train TorchTrainer.

One-hot labels, replaced by the zero vector with probability p_uncond so the same network also
learns the unconditional score that classifier-free guidance needs.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from oodscale import tracking
from oodscale.config import DiffusionConfig, ExperimentConfig, steps_per_epoch
from oodscale.data.shards import Manifest
from oodscale.data.streams import to_model_input, training_set, worker_data
from oodscale.diffusion.generators import (
    GENERATORS,
    MODEL_CARD,
    TRAINED_DIR,
    content_hash,
    model_card,
)
from oodscale.diffusion.mixup import one_hot
from oodscale.distributed import (
    copy_checkpoint,
    make_worker_accelerator,
    prepare,
    report,
    resumed_state,
    run_trainer,
)
from oodscale.errors import InputError
from oodscale.lazy import load
from oodscale.progress import epoch_progress
from oodscale.runtime import RunLayout, derive_seed, resolve_use_gpu, seed_everything
from oodscale.weights import load_weights

if TYPE_CHECKING:
    from diffusers import ModelMixin


def build_model(cfg: ExperimentConfig, manifest: Manifest) -> ModelMixin:
    """The untrained model of the config's generator (its table row's builder)."""
    return load(GENERATORS[cfg.generate.generator].model)(cfg, manifest)


def make_scheduler(timesteps: int):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2")


SAMPLING_DIR = "sampling"  # in a checkpoint: the weights samples are drawn from (the EMA's)
EMA_STATE = "ema.json"  # in a checkpoint: EMAModel's step and settings (its weights: SAMPLING_DIR)
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' save_pretrained file name


def make_ema(model: torch.nn.Module, d: DiffusionConfig):
    """diffusers' EMAModel over `model`'s parameters (on their device), or None when
    diffusion.ema_decay is 0."""
    from diffusers.training_utils import EMAModel

    if d.ema_decay == 0:
        return None
    warmup = d.ema_warmup_power is not None
    return EMAModel(model.parameters(), decay=d.ema_decay, use_ema_warmup=warmup,
                    inv_gamma=1.0, power=d.ema_warmup_power if warmup else 2 / 3, foreach=True)


def make_lr_schedule(optimizer: torch.optim.Optimizer, d: DiffusionConfig, total_steps: int):
    """diffusers' `get_scheduler` over the run's optimiser steps, stepped once per step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(d.lr_schedule, optimizer, num_warmup_steps=d.lr_warmup_steps,
                         num_training_steps=total_steps)


def sampling_weights(model: ModelMixin, ema) -> ModelMixin:
    """The model samples are drawn from: a copy holding the EMA weights, or `model` itself."""
    if ema is None:
        return model
    # built on the EMA's device, so the copy stays on it (save_pretrained reads it from there)
    averaged = type(model).from_config(model.config).to(ema.shadow_params[0].device)
    ema.copy_to(averaged.parameters())
    return averaged


def save_training_state(path: Path, model: ModelMixin, ema, optimizer,
                        lr_schedule) -> None:
    """A resumable checkpoint: the raw weights, the EMA weights under SAMPLING_DIR (what gets
    published) with EMAModel's step in EMA_STATE, optimiser and lr-schedule state."""
    model.save_pretrained(path, safe_serialization=True)
    sampling_weights(model, ema).save_pretrained(path / SAMPLING_DIR, safe_serialization=True)
    if ema is not None:
        state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        (path / EMA_STATE).write_text(json.dumps(state, sort_keys=True))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(lr_schedule.state_dict(), path / "schedule.pt")


def restore_weights(path: Path, model: ModelMixin) -> None:
    """The checkpoint's raw weights into a model built from the config (not `from_pretrained`,
    whose config would carry the checkpoint's temporary path into every later save)."""
    model.load_state_dict(load_weights(path / WEIGHTS_FILE))


def load_training_state(path: Path, model: ModelMixin, ema, optimizer,
                        lr_schedule) -> None:
    """Restore what `save_training_state` wrote into the EMA (over `model`'s parameters),
    the optimiser and the lr schedule (the raw weights: `restore_weights`, before the
    optimiser is built)."""
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    lr_schedule.load_state_dict(torch.load(path / "schedule.pt", weights_only=True))
    if ema is None:
        return
    if not (path / EMA_STATE).is_file():
        raise InputError(f"the checkpoint at {path} holds no EMA state (written with "
                         f"diffusion.ema_decay=0): resume it with ema_decay=0 or start over")
    averaged = load_weights(path / SAMPLING_DIR / WEIGHTS_FILE)
    shadow = [averaged[name].to(param.device) for name, param in model.named_parameters()]
    ema.load_state_dict({**json.loads((path / EMA_STATE).read_text()), "shadow_params": shadow})


def diffusion_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop: noise-prediction MSE on streamed ID shards, an lr warm-up and
    schedule, an EMA of the weights updated every step.

    The noise, timesteps and label drop of epoch e come from a seed of (run seed, rank, e)
    alone, and a resumed run on cached data skips the batches its checkpoint holds, so a
    resumed DDPM equals an uninterrupted one."""
    import ray.train

    cfg = ExperimentConfig.model_validate(config["cfg"])
    manifest = Manifest.from_json(config["manifest"])
    d = cfg.diffusion
    rank = ray.train.get_context().get_world_rank()
    seed_everything(derive_seed(cfg.seed, "diffusion", rank))
    accelerator = make_worker_accelerator(d, config["use_gpu"])
    steps = config["steps_per_epoch"]
    start_epoch = 0
    with resumed_state() as (ckpt, state):
        model = build_model(cfg, manifest)
        if ckpt is not None:
            restore_weights(ckpt, model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=d.lr, weight_decay=0.0)
        lr_schedule = make_lr_schedule(optimizer, d, d.epochs * steps)
        model, optimizer = prepare(accelerator, model, optimizer)
        ema = make_ema(accelerator.unwrap_model(model), d)
        if ckpt is not None:
            load_training_state(ckpt, accelerator.unwrap_model(model), ema, optimizer,
                                lr_schedule)
            start_epoch = state["epoch"] + 1
    scheduler = make_scheduler(d.timesteps)
    num_classes = len(manifest.class_names)
    device = accelerator.device
    data = worker_data(config, device)["id"]
    batches = data.batches(d.batch_size, derive_seed(cfg.seed, "diffusion-batches", rank))
    if start_epoch and data.cached:
        for _ in range(start_epoch * steps):
            next(batches)
    for epoch in range(start_epoch, d.epochs):
        model.train()
        torch.manual_seed(derive_seed(cfg.seed, "diffusion-noise", rank, epoch))
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
            lr_schedule.step()
            if ema is not None:
                ema.step(accelerator.unwrap_model(model).parameters())
            total += loss.detach()  # summed on the device, read once per epoch
        metrics = {"epoch": epoch, "loss": total.item() / steps,
                   "images_per_s": steps * d.batch_size / (time.time() - started),
                   "lr": lr_schedule.get_last_lr()[0], "first_epoch": start_epoch,
                   "ema_steps": ema.optimization_step if ema is not None else 0}
        write = None
        if epoch == d.epochs - 1 or (epoch + 1) % config["checkpoint_every"] == 0:
            unwrapped = accelerator.unwrap_model(model)

            def write(path: Path, unwrapped=unwrapped) -> None:
                save_training_state(path, unwrapped, ema, optimizer, lr_schedule)

        report(metrics, accelerator, write)


def train_diffusion(cfg: ExperimentConfig, layout: RunLayout) -> dict[str, Any]:
    """Train (or resume) the config's generator and publish it under `<run>/diffusion`;
    returns its card."""
    storage = layout.storage
    card_path = f"{layout.diffusion_dir}/{MODEL_CARD}"
    if storage.exists(card_path):
        return model_card(cfg, layout)  # refuses another generator's card
    d = cfg.diffusion
    dataset, manifest = training_set(storage, layout.id_split("train"), d.num_workers, d.cache_mb)
    steps = steps_per_epoch(manifest.num_samples, d.batch_size, d.num_workers)
    with epoch_progress("train-diffusion", d.epochs, tracking.epoch_logger()):
        result = run_trainer(
            diffusion_loop,
            {"cfg": cfg.model_dump(), "manifest": manifest.to_json(), "steps_per_epoch": steps,
             "checkpoint_every": max(1, d.epochs // 4)},
            {"id": dataset}, d, layout, name=f"{cfg.name}-diffusion")
    weights_dir = f"{layout.diffusion_dir}/{TRAINED_DIR}"
    copy_checkpoint(result, layout, weights_dir, SAMPLING_DIR)  # the EMA weights
    card = {"generator": cfg.generate.generator, "epochs": d.epochs,
            "final_loss": result.metrics.get("loss"),
            "images_per_s": result.metrics.get("images_per_s"),
            "steps": d.epochs * steps, "lr": d.lr, "lr_schedule": d.lr_schedule,
            "lr_warmup_steps": d.lr_warmup_steps, "ema_decay": d.ema_decay,
            "ema_warmup_power": d.ema_warmup_power, "ema_steps": result.metrics.get("ema_steps"),
            "first_epoch": result.metrics.get("first_epoch"),
            "num_classes": len(manifest.class_names), "class_names": manifest.class_names,
            "image_size": manifest.image_size, "channels": manifest.channels,
            "timesteps": d.timesteps, "model_hash": _hash_remote(layout, weights_dir)}
    if d.quality_per_class:
        card["quality"] = measure_quality(cfg, layout, card)
    storage.write_bytes_atomic(card_path, json.dumps(card, indent=2).encode())
    return card


def measure_quality(cfg: ExperimentConfig, layout: RunLayout, card: dict[str, Any],
                    ) -> dict[str, Any]:
    """`quality.measure_stored_ddpm` in a Ray task with a diffusion worker's resources."""
    import ray

    from oodscale.diffusion.quality import measure_stored_ddpm

    d = cfg.diffusion
    use_gpu = resolve_use_gpu(d.use_gpu)
    task = ray.remote(measure_stored_ddpm).options(num_cpus=d.cpus_per_worker,
                                                   num_gpus=1 if use_gpu else 0)
    started = time.time()
    figures = ray.get(task.remote(layout.storage.uri, cfg.model_dump(), card, use_gpu))
    print(f"[oodscale] DDPM sample quality ({time.time() - started:.0f}s): conditional accuracy "
          f"{figures['conditional_accuracy']:.1f} % (reference on ID test "
          f"{figures['reference_test_accuracy']:.1f} %), Fréchet distance "
          f"{figures['frechet_distance']:.3g}, label-mixup mass on a+b "
          f"{figures['mix_pair_mass']:.2f}, entropy {figures['mix_entropy']:.2f}", flush=True)
    return figures


def _hash_remote(layout: RunLayout, weights_dir: str) -> str:
    """Content hash of the saved weights, wherever they live."""
    with tempfile.TemporaryDirectory() as tmp:
        return content_hash(layout.storage.fetch_dir(weights_dir, Path(tmp)))
