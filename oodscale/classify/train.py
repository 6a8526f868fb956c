"""The train stage: OE metric-learning classifiers in Ray Train with Accelerate DDP.

Each step concatenates an ID batch and an outlier batch into one forward pass (BatchNorm sees
both); loss = L_id(ID rows) + λ_oe · KL(U ‖ softmax(logits of outlier rows)).

The cells of the grid share one Ray Train worker group: a group takes 20-30 s to start, more
than a small cell trains. Its loop trains the pending cells one after another, publishes each
under classifiers/<run> as it finishes, and resumes the cell it was in after a restart. Cells
that use the ambiguity-filtered outliers need the plain classifier first, so they form a second
group after the filter.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oodscale import tracking
from oodscale.classify.ambiguity import filter_synthetic
from oodscale.classify.augment import Augment
from oodscale.classify.checkpoints import (
    CARD,
    WEIGHTS,
    classifier_from_card,
    load_classifier,
    save_classifier,
)
from oodscale.classify.grid import RunSpec, grid
from oodscale.classify.loss_table import BASELINE_LOSS
from oodscale.classify.pretrained import init_from_torchvision
from oodscale.classify.step import train_epoch
from oodscale.config import ExperimentConfig, steps_per_epoch
from oodscale.data.shards import Manifest
from oodscale.data.streams import RankData, to_model_input, training_set, worker_data
from oodscale.distributed import (
    make_worker_accelerator,
    prepare,
    publish_dir,
    report,
    resumed_state,
    run_trainer,
)
from oodscale.errors import InputError
from oodscale.outlier_sources import NO_OUTLIERS, OutlierSource, generator_sources, parse_source
from oodscale.outliers import OutlierStream
from oodscale.progress import epoch_progress
from oodscale.runtime import (
    RunLayout,
    derive_seed,
    open_storage,
    resolve_use_gpu,
    seed_everything,
)

SUMMARY_KEYS = ("loss", "id_loss", "oe_loss", "train_acc", "images_per_s")


def pair_seed(card: dict[str, Any], *purpose: object) -> int:
    """A seed from what a cell shares with its paired cells (seed, loss, backbone, data), not
    from its outlier source: the cells of one seed and loss start from the same weights and
    see the same ID batches, so their difference is the OE term's alone."""
    return derive_seed(card["seed"], card["loss"], card["backbone"], card["embedding_dim"],
                       card["image_size"], card["channels"], ",".join(card["class_names"]),
                       *purpose)


def initial_classifier(card: dict[str, Any]):
    """The cell's classifier at its initial weights (the same on every rank and for every
    outlier source of its pair)."""
    seed_everything(pair_seed(card, "init"))
    return classifier_from_card(card)


def _card(cfg: ExperimentConfig, spec: RunSpec, manifest: Manifest) -> dict[str, Any]:
    t = cfg.train
    card = {"loss": spec.loss, "outliers": spec.outliers, "seed": spec.seed, "run": spec.name,
            "backbone": t.backbone, "embedding_dim": t.embedding_dim,
            "head_options": t.head_options.get(spec.loss, {}),
            "num_classes": len(manifest.class_names), "class_names": manifest.class_names,
            "image_size": manifest.image_size, "channels": manifest.channels,
            "lambda_oe": t.lambda_oe, "epochs": t.epochs, "init_checkpoint": t.init_checkpoint,
            "augment": t.augment.model_dump()}
    if parse_source(spec.outliers, cfg.generate.guidance).finetune:
        card.update(epochs=t.finetune_epochs, lr=finetune_lr(cfg),
                    finetunes=RunSpec(spec.loss, "none", spec.seed).name)
    return card


def finetune_lr(cfg: ExperimentConfig) -> float:
    """The peak lr of OE fine-tuning: `train.finetune_lr`, by default a tenth of `train.lr`
    (the converged classifier is moved, not retrained)."""
    return cfg.train.finetune_lr or cfg.train.lr / 10


@dataclass
class _Resume:
    """What the last checkpoint holds: which cell, its epoch, its tensors (read once)."""

    run: str
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]


def _read_resume() -> _Resume | None:
    from safetensors.torch import load_file

    with resumed_state() as (ckpt, state):
        if ckpt is None or "run" not in state:
            return None
        return _Resume(state["run"], state, load_file(str(ckpt / WEIGHTS)),
                       torch.load(ckpt / "optimizer.pt", weights_only=True),
                       torch.load(ckpt / "schedule.pt", weights_only=True))


def classifier_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop: every pending cell of `config["cards"]`, one after another."""
    cfg = ExperimentConfig.model_validate(config["cfg"])
    t = cfg.train
    layout = RunLayout(open_storage(config["storage_root"]), cfg.name)
    accelerator = make_worker_accelerator(t, config["use_gpu"])
    data = worker_data(config, accelerator.device)
    resume = _read_resume()
    for card in config["cards"]:
        if layout.storage.exists(f"{layout.classifier_dir(card['run'])}/{CARD}"):
            continue  # published by an earlier attempt of this run
        train_cell(cfg, layout, card, accelerator, data, config,
                   resume if resume is not None and resume.run == card["run"] else None)
        accelerator.free_memory()  # drop the finished cell's model and optimizer


def train_cell(cfg: ExperimentConfig, layout: RunLayout, card: dict[str, Any], accelerator,
               data: dict[str, RankData], config: dict[str, Any], resume: _Resume | None,
               ) -> None:
    """Train one grid cell in the worker group and publish it under classifiers/<run>."""
    import ray.train

    t = cfg.train
    rank = ray.train.get_context().get_world_rank()
    model = initial_classifier(card)
    if "finetunes" in card and resume is None:
        model.load_state_dict(_finished_weights(layout, card["finetunes"]))
    elif t.init_checkpoint and resume is None:
        init_from_torchvision(model.backbone, t.init_checkpoint)
    lr, epochs = card.get("lr", t.lr), card["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=t.weight_decay)
    steps = config["steps_per_epoch"]
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)
    start_epoch, metrics = 0, {}
    if resume is not None:
        model.load_state_dict(resume.weights)
        optimizer.load_state_dict(resume.optimizer)
        lr_schedule.load_state_dict(resume.schedule)
        start_epoch = resume.state["epoch"] + 1
        metrics = {k: resume.state[k] for k in SUMMARY_KEYS if k in resume.state}
    model, optimizer = prepare(accelerator, model, optimizer)
    device = accelerator.device
    id_batches = data["id"].batches(t.batch_size, pair_seed(card, "id", rank))
    source, synthetic = card["outliers"], config["outlier_data"].get(card["run"])
    outliers = OutlierStream(
        source, t.outlier_batch_size, card["num_classes"],
        derive_seed(card["seed"], card["run"], "outliers", rank), device,
        data[synthetic].batches(t.outlier_batch_size,
                                derive_seed(card["seed"], card["run"], "syn", rank))
        if synthetic else None)
    if start_epoch and all(data[name].cached for name in ("id", synthetic) if name):
        skip_batches(id_batches, outliers, start_epoch * steps)
    for epoch in range(start_epoch, epochs):
        # the ID rows' augmentation is the pair's, the outliers' the cell's own
        augment = Augment(t.augment, pair_seed(card, "augment", rank, epoch), device)
        augment_outliers = Augment(t.augment, derive_seed(card["seed"], card["run"],
                                                          "augment-outliers", rank, epoch), device)
        metrics = {**train_epoch(model, optimizer, accelerator, lr_schedule, id_batches,
                                 outliers, steps, t.lambda_oe, augment, augment_outliers),
                   "epoch": epoch}
        write = None
        if epoch == epochs - 1 or (epoch + 1) % config["checkpoint_every"] == 0:
            unwrapped = accelerator.unwrap_model(model)

            def write(path: Path, unwrapped=unwrapped, epoch=epoch) -> None:
                save_classifier(unwrapped, {**card, "epoch": epoch, "step": (epoch + 1) * steps},
                                path)
                torch.save(optimizer.state_dict(), path / "optimizer.pt")
                torch.save(lr_schedule.state_dict(), path / "schedule.pt")

        report(metrics, accelerator, write, label=card["run"], state={"run": card["run"]})
    if accelerator.is_main_process:
        # first_epoch > 0 says the cell resumed from a checkpoint rather than starting over
        summary = {**{k: metrics.get(k) for k in SUMMARY_KEYS}, "first_epoch": start_epoch}
        final = {**card, "epoch": epochs - 1, "step": epochs * steps, "train": summary}
        with tempfile.TemporaryDirectory() as tmp:
            save_classifier(accelerator.unwrap_model(model), final, Path(tmp))
            publish_dir(layout.storage, tmp, layout.classifier_dir(card["run"]), last=(CARD,))
        print(f"[oodscale] trained {card['run']}", flush=True)
    accelerator.wait_for_everyone()  # a later cell may fine-tune this one: it must be published


def _finished_weights(layout: RunLayout, run: str) -> dict[str, torch.Tensor]:
    """The published weights of the cell `run` (the `none` cell a `-ft` cell fine-tunes)."""
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_classifier(layout.storage.fetch_dir(layout.classifier_dir(run),
                                                            Path(tmp)))
    return model.state_dict()


def skip_batches(id_batches, outliers: OutlierStream, steps: int) -> None:
    """Draw and drop the batches of the epochs a checkpoint already holds, so a resumed cell
    trains on the batches an uninterrupted one would: with its data kept on the device, the
    resumed classifier equals the uninterrupted one bit for bit. (Streamed data would have to
    be read again to skip; there a resumed cell starts the stream afresh.)"""
    for _ in range(steps):
        batch = next(id_batches)
        outliers.next(to_model_input(batch["image"]), batch["label"])


def train_group(cfg: ExperimentConfig, layout: RunLayout, specs: list[RunSpec], id_data,
                manifest: Manifest, outlier_sets: dict[str, tuple[Any, Manifest]],
                name: str) -> None:
    """Train `specs` in one Ray Train worker group (resuming if interrupted).

    `outlier_sets` maps a label-mixup directory name to its dataset and manifest.
    """
    t = cfg.train
    steps = t.steps_per_epoch or steps_per_epoch(manifest.num_samples, t.batch_size,
                                                 t.num_workers)
    outlier_data = {}
    for spec in specs:
        source = parse_source(spec.outliers, cfg.generate.guidance)
        if source.needs_generator:
            outlier_data[spec.name] = f"outliers:{source.dirname}"
    datasets = {"id": id_data}
    for key in sorted(set(outlier_data.values())):
        datasets[key] = outlier_sets[key.removeprefix("outliers:")][0]
    run_trainer(
        classifier_loop,
        {"cfg": cfg.model_dump(), "cards": [_card(cfg, s, manifest) for s in specs],
         "storage_root": layout.storage.uri, "steps_per_epoch": steps,
         "checkpoint_every": max(1, t.epochs // 3), "outlier_data": outlier_data},
        datasets, t, layout, name=name)


def _outlier_data(cfg: ExperimentConfig, layout: RunLayout, source: OutlierSource,
                  manifest: Manifest, plain: str | None) -> tuple[Any, Manifest]:
    """What the workers read a generator source's shards from (`training_set`) and their
    manifest, filtered first if the source asks for that (by the finished plain classifier
    `plain`)."""
    directory = layout.synthetic_variant(source.dirname)
    if source.filtered:
        gen = cfg.generate
        filtered = filter_synthetic(
            layout, layout.synthetic_variant(source.unfiltered.dirname), directory,
            plain, gen.filter_tau, gen.concurrency, gen.cpus_per_actor,
            resolve_use_gpu(gen.use_gpu))
        print(f"[oodscale] ambiguity filter (tau {gen.filter_tau}) kept {filtered.extra['kept']}"
              f" of {filtered.extra['total']} samples ({100 * filtered.extra['kept_fraction']:.1f}"
              f"%) in {layout.storage.uri_of(directory)}", flush=True)
    t = cfg.train
    data, syn_manifest = training_set(layout.storage, directory, t.num_workers, t.cache_mb,
                                      hint="run `oodscale generate`")
    if syn_manifest.class_names != manifest.class_names:
        raise InputError("the synthetic shards were drawn for other ID classes "
                         f"({syn_manifest.class_names} vs {manifest.class_names}); rerun "
                         "train-diffusion and generate for this config")
    return data, syn_manifest


def train_classifiers(cfg: ExperimentConfig, layout: RunLayout) -> list[dict[str, Any]]:
    """Train every grid cell that has no finished checkpoint; returns one summary per run
    trained now.

    One worker group trains the cells that need no filtered outliers (and the plain classifier
    the filter needs: softmax, no outliers, first seed); a second trains the filtered cells.
    """
    storage = layout.storage
    id_data, manifest = training_set(storage, layout.id_split("train"), cfg.train.num_workers,
                                     cfg.train.cache_mb)
    default = cfg.generate.guidance

    def finished(spec: RunSpec) -> bool:
        return storage.exists(f"{layout.classifier_dir(spec.name)}/{CARD}")

    pending = [s for s in grid(cfg) if not finished(s)]
    filtered = [s for s in pending if parse_source(s.outliers, default).filtered]
    # a -ft cell fine-tunes its none cell, so it trains after every cell without -ft
    first = sorted((s for s in pending if s not in filtered),
                   key=lambda s: parse_source(s.outliers, default).finetune)
    plain = RunSpec(BASELINE_LOSS, NO_OUTLIERS, cfg.train.seeds[0])
    if filtered and not finished(plain) and plain not in first:
        first.insert(0, plain)
    cells = {s.name: {"loss": s.loss, "outliers": s.outliers, "seed": s.seed}
             for s in first + filtered}
    epochs = sum(cfg.train.finetune_epochs if parse_source(s.outliers, default).finetune
                 else cfg.train.epochs for s in first + filtered)
    with epoch_progress("train", epochs, tracking.epoch_logger(cells)):
        for group, name in ((first, f"{cfg.name}-classifiers"),
                            (filtered, f"{cfg.name}-classifiers-filtered")):
            if not group:
                continue
            sources = generator_sources([s.outliers for s in group], default)
            outlier_sets = {s.dirname: _outlier_data(cfg, layout, s, manifest, plain.name)
                            for s in sources}
            train_group(cfg, layout, group, id_data, manifest, outlier_sets, name)
    return [{"run": s.name, **json.loads(storage.read_bytes(
        f"{layout.classifier_dir(s.name)}/{CARD}")).get("train", {})} for s in pending]
