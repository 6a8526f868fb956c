"""The train stage: OE metric-learning classifiers in Ray Train with Accelerate DDP.

Each step concatenates an ID batch and an outlier batch into one forward pass (BatchNorm sees
both); loss = L_id(ID rows) + λ_oe · KL(U ‖ softmax(logits of outlier rows)).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oodscale.classify.ambiguity import filter_synthetic
from oodscale.classify.checkpoints import CARD, WEIGHTS, classifier_from_card, save_classifier
from oodscale.classify.outliers import OutlierStream
from oodscale.classify.step import STEP_FIGURES, oe_step
from oodscale.config import ExperimentConfig, steps_per_epoch
from oodscale.data.shards import Manifest
from oodscale.data.streams import endless_batches, read_shards, to_model_input
from oodscale.diffusion.variants import LabelmixVariant, labelmix_variant
from oodscale.distributed import (
    copy_checkpoint,
    make_accelerator,
    report,
    resumed_state,
    run_trainer,
)
from oodscale.runtime import RunLayout, derive_seed, resolve_use_gpu, seed_everything


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: loss × outlier source × seed."""

    loss: str
    outliers: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.loss}-{self.outliers}-s{self.seed}"


def grid(cfg: ExperimentConfig) -> list[RunSpec]:
    t = cfg.train
    return [RunSpec(loss, out, seed)
            for loss, out, seed in itertools.product(t.losses, t.outliers, t.seeds)]


def _card(cfg: ExperimentConfig, spec: RunSpec, manifest: Manifest) -> dict[str, Any]:
    t = cfg.train
    return {"loss": spec.loss, "outliers": spec.outliers, "seed": spec.seed, "run": spec.name,
            "backbone": t.backbone, "embedding_dim": t.embedding_dim,
            "head_options": t.head_options.get(spec.loss, {}),
            "num_classes": len(manifest.class_names), "class_names": manifest.class_names,
            "image_size": manifest.image_size, "channels": manifest.channels,
            "lambda_oe": t.lambda_oe, "epochs": t.epochs}


def classifier_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop for one grid cell."""
    import ray.train

    cfg = ExperimentConfig.model_validate(config["cfg"])
    t = cfg.train
    card = config["card"]
    rank = ray.train.get_context().get_world_rank()
    seed_everything(derive_seed(card["seed"], card["run"], "init"))  # same init on every rank
    accelerator = make_accelerator(t.mixed_precision, config["use_gpu"])
    model = classifier_from_card(card)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    steps = config["steps_per_epoch"]
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=t.lr, total_steps=t.epochs * steps, pct_start=0.15)
    start_epoch = 0
    with resumed_state() as (ckpt, state):
        if ckpt is not None:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(ckpt / WEIGHTS)))
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            lr_schedule.load_state_dict(torch.load(ckpt / "schedule.pt", weights_only=True))
            start_epoch = state["epoch"] + 1
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    id_batches = endless_batches(ray.train.get_dataset_shard("id"), t.batch_size,
                                 derive_seed(card["seed"], card["run"], "id", rank), device)
    source = card["outliers"]
    outliers = OutlierStream(
        source, t.outlier_batch_size, card["num_classes"],
        derive_seed(card["seed"], card["run"], "outliers", rank), device,
        endless_batches(ray.train.get_dataset_shard("outliers"), t.outlier_batch_size,
                        derive_seed(card["seed"], card["run"], "syn", rank), device)
        if source.startswith("labelmix") else None)
    for epoch in range(start_epoch, t.epochs):
        model.train()
        sums = torch.zeros(len(STEP_FIGURES), device=device)
        started = time.time()
        for _ in range(steps):
            batch = next(id_batches)
            x, y = to_model_input(batch["image"]), batch["label"]
            sums += oe_step(model, optimizer, accelerator, x, y, outliers.next(x, y),
                            t.lambda_oe)
            lr_schedule.step()
        metrics = dict(zip(STEP_FIGURES, (sums / steps).tolist(), strict=True))  # one sync
        metrics.update(epoch=epoch, train_acc=100 * metrics.pop("correct"),
                       images_per_s=steps * t.batch_size / (time.time() - started))
        if epoch == t.epochs - 1 or (epoch + 1) % config["checkpoint_every"] == 0:
            unwrapped = accelerator.unwrap_model(model)

            def write(path: Path, unwrapped=unwrapped, epoch=epoch) -> None:
                save_classifier(unwrapped, {**card, "epoch": epoch, "step": (epoch + 1) * steps},
                                path)
                torch.save(optimizer.state_dict(), path / "optimizer.pt")
                torch.save(lr_schedule.state_dict(), path / "schedule.pt")

            report(metrics, accelerator, write)
        else:
            report(metrics, accelerator, None)


def train_one(cfg: ExperimentConfig, layout: RunLayout, spec: RunSpec, id_data, manifest: Manifest,
              outliers=None) -> dict[str, Any]:
    """Train one grid cell (resuming if interrupted) and publish it under classifiers/<run>."""
    t = cfg.train
    steps = t.steps_per_epoch or steps_per_epoch(manifest.num_samples, t.batch_size,
                                                 t.num_workers)
    datasets = {"id": id_data} if outliers is None else {"id": id_data, "outliers": outliers}
    result = run_trainer(
        classifier_loop,
        {"cfg": cfg.model_dump(), "card": _card(cfg, spec, manifest), "steps_per_epoch": steps,
         "checkpoint_every": max(1, t.epochs // 3)},
        datasets, t, layout, name=f"{cfg.name}-{spec.name}")
    copy_checkpoint(result, layout, layout.classifier_dir(spec.name))
    print(f"[oodscale] trained {spec.name}", flush=True)
    return {"run": spec.name, **{k: result.metrics.get(k) for k in
                                 ("loss", "id_loss", "oe_loss", "train_acc", "images_per_s")}}


def _outlier_data(cfg: ExperimentConfig, layout: RunLayout, variant: LabelmixVariant,
                  manifest: Manifest, plain_ready) -> Any:
    """The Ray Dataset of a label-mixup variant, filtering it first if it asks for that."""
    default = cfg.generate.guidance
    directory = layout.synthetic_variant(variant.dirname(default))
    if variant.filtered:
        gen = cfg.generate
        filtered = filter_synthetic(
            layout, layout.synthetic_variant(variant.unfiltered.dirname(default)), directory,
            plain_ready(), gen.filter_tau, gen.concurrency, gen.cpus_per_actor,
            resolve_use_gpu(gen.use_gpu))
        print(f"[oodscale] ambiguity filter (tau {gen.filter_tau}) kept {filtered.extra['kept']}"
              f" of {filtered.extra['total']} samples ({100 * filtered.extra['kept_fraction']:.1f}"
              f"%) in {layout.storage.uri_of(directory)}", flush=True)
    data, syn_manifest = read_shards(layout.storage, directory, hint="run `oodscale generate`")
    if syn_manifest.class_names != manifest.class_names:
        raise ValueError("the synthetic shards were drawn for other ID classes "
                         f"({syn_manifest.class_names} vs {manifest.class_names}); rerun "
                         "train-diffusion and generate for this config")
    return data


def train_classifiers(cfg: ExperimentConfig, layout: RunLayout) -> list[dict[str, Any]]:
    """Train every grid cell that has no finished checkpoint; returns one summary per run.

    Filtered label-mixup variants need the plain classifier (softmax, no outliers, first seed)
    first, so cells are trained in that order.
    """
    storage = layout.storage
    id_data, manifest = read_shards(storage, layout.id_split("train"))

    def finished(spec: RunSpec) -> bool:
        return storage.exists(f"{layout.classifier_dir(spec.name)}/{CARD}")

    plain = RunSpec("softmax", "none", cfg.train.seeds[0])
    summaries: list[dict[str, Any]] = []

    def plain_ready() -> str:
        if not finished(plain):
            summaries.append(train_one(cfg, layout, plain, id_data, manifest))
        return plain.name

    specs = sorted(grid(cfg), key=lambda s: s.outliers.endswith("-filtered"))
    data_by_variant: dict[LabelmixVariant, Any] = {}
    for spec in specs:
        if finished(spec):
            continue
        variant = labelmix_variant(spec.outliers, cfg.generate.guidance)
        if variant is not None and variant not in data_by_variant:
            data_by_variant[variant] = _outlier_data(cfg, layout, variant, manifest, plain_ready)
        summaries.append(train_one(cfg, layout, spec, id_data, manifest,
                                   data_by_variant.get(variant)))
    return summaries
