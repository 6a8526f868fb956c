"""The generate stage: label-mixup outliers fanned out over a Ray Data actor pool.

Rows are shard indices; finished shards are appended to the manifest as they arrive (each
rewrite atomic), so an interrupted run keeps its work and a rerun draws only what is missing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodscale.config import ExperimentConfig, GenerateConfig
from oodscale.data.shards import (
    Manifest,
    ShardInfo,
    drop_damaged,
    try_read_manifest,
    write_manifest,
)
from oodscale.devices import worker_device
from oodscale.diffusion.mixup import one_hot
from oodscale.diffusion.model import load_unet
from oodscale.diffusion.sample import (
    ShardSampler,
    draw_labelmix,
    make_sampler,
    sample_images,
    sampling_autocast,
)
from oodscale.diffusion.train import MODEL_CARD
from oodscale.diffusion.variants import LabelmixVariant, labelmix_variant
from oodscale.progress import track
from oodscale.runtime import RunLayout, open_storage, require_gpus, resolve_use_gpu


def _generation_params(cfg: ExperimentConfig, card: dict[str, Any]) -> dict[str, Any]:
    """What determines the shard contents; a rerun must match it to resume."""
    gen = cfg.generate
    return {"seed": cfg.seed, "model": card["model_hash"], "samples_per_shard":
            gen.samples_per_shard, "lam": gen.lam.model_dump(), "mode": gen.mode,
            "guidance": gen.guidance, "sampler": gen.sampler, "steps": gen.steps,
            "batch_size": gen.batch_size}


def needed_variants(cfg: ExperimentConfig) -> list[LabelmixVariant]:
    """Every label-mixup variant the training grid uses, the config's own first."""
    default = cfg.generate.guidance
    found = [labelmix_variant(name, default) for name in cfg.train.outliers]
    variants = [v for v in found if v is not None]
    return sorted(set(variants), key=lambda v: (v.guidance != default, v.guidance, v.filtered))


def generate(cfg: ExperimentConfig, layout: RunLayout) -> list[Manifest]:
    """Draw every unfiltered label-mixup variant the grid needs (the default one at least)."""
    guidances = {v.guidance for v in needed_variants(cfg)} | {cfg.generate.guidance}
    default = cfg.generate.guidance
    ordered = sorted(guidances, key=lambda g: (g != default, g))
    return [generate_variant(cfg.model_copy(update={"generate": cfg.generate.model_copy(
        update={"guidance": g})}), layout, LabelmixVariant(g, False).dirname(default))
        for g in ordered]


def read_model_card(layout: RunLayout) -> dict[str, Any]:
    path = f"{layout.diffusion_dir}/{MODEL_CARD}"
    if not layout.storage.exists(path):
        raise FileNotFoundError(f"no trained DDPM at {layout.storage.uri_of(layout.diffusion_dir)}"
                                f": run `oodscale train-diffusion` first")
    return json.loads(layout.storage.read_bytes(path))


def generate_variant(cfg: ExperimentConfig, layout: RunLayout, dirname: str) -> Manifest:
    """Draw every missing synthetic shard, keep the manifest current, then draw the grid."""
    import ray.data

    storage, gen = layout.storage, cfg.generate
    out_dir = layout.synthetic_variant(dirname)
    card = read_model_card(layout)
    params = _generation_params(cfg, card)
    manifest = try_read_manifest(storage, out_dir)
    if manifest is not None and manifest.extra.get("params") != params:
        raise ValueError(f"{storage.uri_of(out_dir)} holds shards drawn with other "
                         f"settings ({manifest.extra.get('params')}); delete that directory or "
                         f"set storage.root / name to a new location")
    if manifest is None:
        manifest = Manifest(kind="synthetic", split="labelmix", image_size=card["image_size"],
                            channels=card["channels"], class_names=card["class_names"],
                            extra={"params": params, "num_shards": gen.num_shards})
    for problem in drop_damaged(storage, out_dir, manifest):
        print(f"[oodscale] redrawing: {problem}", flush=True)
    done = {int(s.path.split("-")[-1].split(".")[0]) for s in manifest.shards}
    todo = [i for i in range(gen.num_shards) if i not in done]
    if todo:
        storage.makedirs(out_dir)
        use_gpu = resolve_use_gpu(gen.use_gpu)
        if use_gpu:
            require_gpus(min(gen.concurrency, len(todo)), "generate.concurrency")
        rows = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
        rows = rows.map_batches(
            ShardSampler, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(gen.concurrency, len(todo))),
            num_cpus=gen.cpus_per_actor, num_gpus=1 if use_gpu else 0,
            fn_constructor_kwargs={
                "storage_root": storage.uri, "model_dir": f"{layout.diffusion_dir}/unet",
                "out_dir": out_dir, "gen": gen.model_dump(),
                "timesteps": card["timesteps"], "run_seed": cfg.seed,
                "model_hash": card["model_hash"], "use_gpu": use_gpu})
        for row in track(rows.iter_rows(), f"generate {out_dir.rsplit('/', 1)[-1]}", len(todo),
                         "shard"):
            manifest.shards.append(ShardInfo.from_row(row))
            manifest.shards.sort(key=lambda s: s.path)
            write_manifest(storage, out_dir, manifest)
    if todo or not storage.exists(f"{out_dir}/grid.png"):
        write_grid(cfg, layout, card, out_dir)
    return manifest


def write_grid(cfg: ExperimentConfig, layout: RunLayout, card: dict[str, Any],
               out_dir: str) -> str:
    """Draw the sample grid in a Ray task with the sampling actors' resources: on a GPU worker
    when generation uses GPUs, never on the driver's CPU."""
    import ray

    gen = cfg.generate
    use_gpu = resolve_use_gpu(gen.use_gpu)
    task = ray.remote(draw_grid).options(num_cpus=gen.cpus_per_actor,
                                         num_gpus=1 if use_gpu else 0)
    return ray.get(task.remote(layout.storage.uri, f"{layout.diffusion_dir}/unet", out_dir,
                               gen.model_dump(), card, cfg.seed, use_gpu))


def draw_grid(storage_root: str, model_dir: str, out_dir: str, gen_config: dict[str, Any],
              card: dict[str, Any], seed: int, use_gpu: bool) -> str:
    """PNG grid: per class a row of ID samples, beside rows of label-mixup samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = GenerateConfig.model_validate(gen_config)
    storage = open_storage(storage_root)
    device = worker_device(use_gpu)
    model = load_unet(storage, model_dir).to(device)
    classes, per = card["num_classes"], gen.grid_per_class
    labels = one_hot(torch.arange(classes).repeat_interleave(per), classes)
    generator = torch.Generator().manual_seed(seed)
    scheduler = make_sampler(gen.sampler, card["timesteps"], gen.steps)
    with sampling_autocast(device):
        id_images = sample_images(model, labels, gen.guidance, scheduler, generator, device)
        mix_images, metas = draw_labelmix(model, gen, card["timesteps"], seed + 1,
                                          classes * per, device)
    id_images = id_images.float().add(1).div(2).permute(0, 2, 3, 1).cpu().numpy()
    fig, axes = plt.subplots(classes, 2 * per, figsize=(2 * per * 0.9, classes * 0.95))
    axes = np.atleast_2d(axes)
    names = card["class_names"]
    for r in range(classes):
        for c in range(per):
            _show(axes[r, c], id_images[r * per + c], f"{names[r]}" if c == 0 else "")
            k = r * per + c
            m = metas[k]
            _show(axes[r, per + c], mix_images[k] / 255.0,
                  f"{names[m['a']]}+{names[m['b']]}")
    fig.suptitle(f"left: ID samples per class | right: label-mixup outliers "
                 f"(guidance {gen.guidance}, mode {gen.mode}; drawn on {device.type})",
                 fontsize=8)
    fig.tight_layout()
    out = f"{out_dir}/grid.png"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.png"
        fig.savefig(path, dpi=110)
        storage.write_bytes_atomic(out, path.read_bytes())
    plt.close(fig)
    return out


def _show(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=1)
    ax.set_title(title, fontsize=6, pad=1)
    ax.axis("off")
