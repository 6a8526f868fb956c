"""The generate stage: label-mixup outliers fanned out over a Ray Data actor pool.

Rows are shard indices; finished shards are appended to the manifest as they arrive (each
rewrite atomic), so an interrupted run keeps its work and a rerun draws only what is missing.
"""

from __future__ import annotations

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
    read_manifest,
    try_read_manifest,
    write_manifest,
)
from oodscale.devices import worker_device
from oodscale.diffusion.classmap import map_classes, to_generator_labels
from oodscale.diffusion.generators import GENERATORS, load_generator, model_card
from oodscale.diffusion.mixup import one_hot
from oodscale.diffusion.sample import (
    ShardSampler,
    draw_labelmix,
    sample_images,
    sampling_autocast,
    scheduler_for,
)
from oodscale.errors import InputError
from oodscale.outlier_sources import generator_sources, synthetic_dirname
from oodscale.progress import track
from oodscale.runtime import RunLayout, open_storage, require_gpus, resolve_use_gpu

GRID_CLASSES = 10  # rows of the sample grid at most: 200 ImageNet classes would not fit


def _generation_params(cfg: ExperimentConfig, card: dict[str, Any],
                       class_map: list[int]) -> dict[str, Any]:
    """What determines the shard contents; a rerun must match it to resume."""
    gen = cfg.generate
    params = {"seed": cfg.seed, "model": card["model_hash"], "samples_per_shard":
              gen.samples_per_shard, "lam": gen.lam.model_dump(), "mode": gen.mode,
              "guidance": gen.guidance, "sampler": gen.sampler, "steps": gen.steps,
              "batch_size": gen.batch_size}
    if GENERATORS[card["generator"]].params_name_generator:
        params.update(generator=card["generator"], source=card["source"], class_map=class_map,
                      image_size=cfg.data.image_size, image_format=gen.image_format,
                      jpeg_quality=gen.jpeg_quality)
    elif gen.image_format != "png":
        params.update(image_format=gen.image_format, jpeg_quality=gen.jpeg_quality)
    if gen.mixed_precision != "auto":  # a key runs from before the option never had
        params.update(mixed_precision=gen.mixed_precision)
    return params


def _class_map(cfg: ExperimentConfig, layout: RunLayout, card: dict[str, Any],
               ) -> tuple[list[str], list[int]]:
    """The ID class names and each one's index among the generator's classes."""
    id_names = read_manifest(layout.storage, layout.id_split("train")).class_names
    if card["channels"] != cfg.data.channels:
        raise InputError(f"generator {card['generator']} draws {card['channels']}-"
                         f"channel images but data.channels={cfg.data.channels}; set "
                         f"data.channels={card['channels']}")
    try:
        return id_names, map_classes(id_names, card["class_names"])
    except ValueError as err:
        hint = ("rerun train-diffusion for these ID classes"
                if GENERATORS[card["generator"]].trained_here
                else "set generate.class_list to the generator's class names")
        raise InputError(f"{err}; {hint}") from None


def generate(cfg: ExperimentConfig, layout: RunLayout) -> list[Manifest]:
    """Draw every guidance scale the grid's generator sources need (the default one at least),
    each into its own `synthetic-w<g>` directory."""
    default = cfg.generate.guidance
    sources = generator_sources(cfg.train.outlier_sources, default)
    guidances = {s.guidance for s in sources} | {default}
    ordered = sorted(guidances, key=lambda g: (g != default, g))
    return [generate_variant(cfg.model_copy(update={"generate": cfg.generate.model_copy(
        update={"guidance": g})}), layout, synthetic_dirname(g)) for g in ordered]


def generate_variant(cfg: ExperimentConfig, layout: RunLayout, dirname: str) -> Manifest:
    """Draw every missing synthetic shard, keeping the manifest current, and the sample grid
    beside them."""
    import ray

    storage, gen = layout.storage, cfg.generate
    out_dir = layout.synthetic_variant(dirname)
    card = model_card(cfg, layout)
    id_names, class_map = _class_map(cfg, layout, card)
    params = _generation_params(cfg, card, class_map)
    manifest = try_read_manifest(storage, out_dir)
    if manifest is not None and manifest.extra.get("params") != params:
        raise InputError(f"{storage.uri_of(out_dir)} holds shards drawn with other "
                         f"settings ({manifest.extra.get('params')}); delete that directory or "
                         f"set storage.root / name to a new location")
    if manifest is None:
        manifest = Manifest(kind="synthetic", split="labelmix", image_size=cfg.data.image_size,
                            channels=card["channels"], class_names=id_names,
                            extra={"params": params, "num_shards": gen.num_shards,
                                   "generator": card["generator"],
                                   "source": card.get("source"), "class_map": class_map})
    for problem in drop_damaged(storage, out_dir, manifest):
        print(f"[oodscale] redrawing: {problem}", flush=True)
    done = {int(s.path.split("-")[-1].split(".")[0]) for s in manifest.shards}
    todo = [i for i in range(gen.num_shards) if i not in done]
    storage.makedirs(out_dir)
    grid = (start_grid(cfg, layout, card, id_names, class_map, out_dir)
            if todo or not storage.exists(f"{out_dir}/grid.png") else None)
    try:
        _draw_shards(cfg, layout, card, class_map, manifest, out_dir, todo)
    except BaseException:
        if grid is not None:
            ray.cancel(grid)
        raise
    if grid is not None:
        ray.get(grid)
    if gen.quality_samples and "quality" not in manifest.extra:
        manifest.extra["quality"] = measure_drawn(cfg, layout, out_dir)
        write_manifest(storage, out_dir, manifest)
    return manifest


def measure_drawn(cfg: ExperimentConfig, layout: RunLayout, out_dir: str) -> dict[str, Any]:
    """How "between" the drawn outliers are (`quality.measure_outliers`), in a Ray task with
    a sampling actor's resources; recorded in the shards' manifest and the report."""
    import ray

    from oodscale.diffusion.quality import measure_outliers

    gen = cfg.generate
    use_gpu = resolve_use_gpu(gen.use_gpu)
    task = ray.remote(measure_outliers).options(num_cpus=gen.cpus_per_actor,
                                                num_gpus=1 if use_gpu else 0)
    figures = ray.get(task.remote(layout.storage.uri, layout.experiment, cfg.seed, out_dir,
                                  gen.quality_samples, use_gpu))
    print(f"[oodscale] {out_dir.rsplit('/', 1)[-1]}: {figures['mix_samples']} outliers put "
          f"{figures['mix_pair_mass']:.2f} of the reference's mass on their two classes "
          f"(weaker share {figures['mix_weaker_share']:.2f}), entropy "
          f"{figures['mix_entropy_ratio']:.2f} of log K", flush=True)
    return figures


def _draw_shards(cfg: ExperimentConfig, layout: RunLayout, card: dict[str, Any],
                 class_map: list[int], manifest: Manifest, out_dir: str, todo: list[int],
                 ) -> None:
    """The missing shards `todo` through the pool of sampling actors; the manifest is
    rewritten as each one lands, so an interrupted stage keeps what it drew."""
    import ray.data

    if not todo:
        return
    storage, gen = layout.storage, cfg.generate
    use_gpu = resolve_use_gpu(gen.use_gpu)
    if use_gpu:
        require_gpus(min(gen.concurrency, len(todo)), "generate.concurrency")
    rows = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
    rows = rows.map_batches(
        ShardSampler, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(gen.concurrency, len(todo))),
        num_cpus=gen.cpus_per_actor, num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs={
            "storage_root": storage.uri, "diffusion_dir": layout.diffusion_dir,
            "out_dir": out_dir, "gen": gen.model_dump(), "card": card,
            "class_map": class_map, "image_size": cfg.data.image_size,
            "run_seed": cfg.seed, "use_gpu": use_gpu})
    for row in track(rows.iter_rows(), f"generate {out_dir.rsplit('/', 1)[-1]}", len(todo),
                     "shard"):
        manifest.shards.append(ShardInfo.from_row(row))
        manifest.shards.sort(key=lambda s: s.path)
        write_manifest(storage, out_dir, manifest)


def start_grid(cfg: ExperimentConfig, layout: RunLayout, card: dict[str, Any],
               id_names: list[str], class_map: list[int], out_dir: str):
    """Start drawing the sample grid in a Ray task with the sampling actors' resources (on a GPU
    worker when generation uses GPUs, never on the driver's CPU); returns its ObjectRef.

    Started beside the shards rather than after them, its process start and model load (~5 s
    on the 2-core machine) overlap the sampling instead of adding to the stage."""
    import ray

    gen = cfg.generate
    use_gpu = resolve_use_gpu(gen.use_gpu)
    task = ray.remote(draw_grid).options(num_cpus=gen.cpus_per_actor,
                                         num_gpus=1 if use_gpu else 0)
    return task.remote(layout.storage.uri, layout.diffusion_dir, out_dir, gen.model_dump(), card,
                       id_names, class_map, cfg.seed, use_gpu)


def draw_grid(storage_root: str, diffusion_dir: str, out_dir: str, gen_config: dict[str, Any],
              card: dict[str, Any], id_names: list[str], class_map: list[int], seed: int,
              use_gpu: bool) -> str:
    """PNG grid: per ID class (the first GRID_CLASSES) a row of class-conditional samples,
    beside rows of label-mixup samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = GenerateConfig.model_validate(gen_config)
    storage = open_storage(storage_root)
    device = worker_device(use_gpu)
    model = load_generator(storage, diffusion_dir, card).to(device)
    classes, per = min(len(id_names), GRID_CLASSES), gen.grid_per_class
    shown = class_map[:classes]  # label-mixup among the shown classes only
    labels = to_generator_labels(one_hot(torch.arange(classes).repeat_interleave(per), classes),
                                 shown, model.num_classes)
    generator = torch.Generator().manual_seed(seed)
    with sampling_autocast(device, gen.mixed_precision):
        id_images = sample_images(model, labels, gen.guidance, scheduler_for(model, gen),
                                  generator, device)
        mix_images, metas = draw_labelmix(model, gen, shown, seed + 1, classes * per, device)
    id_images = id_images.float().add(1).div(2).permute(0, 2, 3, 1).cpu().numpy()
    fig, axes = plt.subplots(classes, 2 * per, figsize=(2 * per * 0.9, classes * 0.95))
    axes = np.atleast_2d(axes)
    names = id_names
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
