"""The ambiguity filter: keep only label-mixup samples a plain ID classifier is unsure of.

A sample the plain softmax classifier (no OE) assigns to one class with MSP above τ looks like a
clean ID image; OE on it teaches the classifier to doubt ID data. A Ray Data actor pool scores
each synthetic shard and writes the kept samples, with their MSP in the provenance, to a sibling
directory under the same shard names; the manifest records the kept fraction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from oodscale.classify.checkpoints import LoadedClassifier
from oodscale.data.shards import (
    Manifest,
    ShardInfo,
    iter_samples,
    read_manifest,
    shard_paths,
    write_manifest,
)
from oodscale.data.shards import write_shard as write_one_shard
from oodscale.errors import InputError
from oodscale.runtime import RunLayout, open_storage, require_gpus


class AmbiguityFilter(LoadedClassifier):
    """Ray Data callable class: the plain classifier loaded once per actor."""

    def __init__(self, storage_root: str, classifier_dir: str, source_dir: str, dest_dir: str,
                 tau: float, use_gpu: bool = False, image_format: str = "png",
                 quality: int = 90):
        super().__init__(storage_root, classifier_dir, use_gpu)
        self.storage = open_storage(storage_root)
        self.source_dir, self.dest_dir, self.tau = source_dir, dest_dir, tau
        self.image_format = (image_format, quality)

    def msp(self, images: np.ndarray) -> np.ndarray:
        """Max softmax probability of N×H×W×C uint8 images."""
        logits, _ = self.embed(images.transpose(0, 3, 1, 2))
        return logits.softmax(1).max(1).values.numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"path": [], "count": [], "sha256": [], "size": [],
                                     "total": []}
        for name in batch["path"].tolist():
            samples = list(iter_samples(self.storage, f"{self.source_dir}/{name}"))
            scores = self.msp(np.stack([image for _, image, _ in samples]))
            kept = [(key, image, {**meta, "filter_msp": float(p), "filter_tau": self.tau,
                                  "filter_model": self.card["run"]})
                    for (key, image, meta), p in zip(samples, scores, strict=True)
                    if p <= self.tau]
            info = write_one_shard(self.storage, self.dest_dir, name, kept, *self.image_format)
            for key, value in (("path", info.path), ("count", info.count),
                               ("sha256", info.sha256), ("size", info.size),
                               ("total", len(samples))):
                out[key].append(value)
        return out


def _image_format(source: Manifest) -> dict[str, Any]:
    """The filtered copy keeps its source's format (JPEG stays JPEG, at the same quality)."""
    params = source.extra.get("params") or {}
    return {"image_format": params.get("image_format", "png"),
            "quality": params.get("jpeg_quality", 90)}


def filter_synthetic(layout: RunLayout, source_dir: str, dest_dir: str, classifier_run: str,
                     tau: float, concurrency: int, cpus_per_actor: float,
                     use_gpu: bool = False) -> Manifest:
    """Write the filtered copy of `source_dir`; reuses it when done with the same τ and model."""
    import ray.data

    storage = layout.storage
    source = read_manifest(storage, source_dir, hint="run `oodscale generate`")
    settings = {"tau": tau, "classifier": classifier_run,
                "source": source.extra.get("params")}
    if storage.exists(f"{dest_dir}/manifest.json"):
        done = read_manifest(storage, dest_dir)
        if done.extra.get("filter") == settings and len(done.shards) == len(source.shards):
            return done
    shard_paths(storage, source_dir, source)  # a damaged source shard is refused, not filtered
    storage.makedirs(dest_dir)
    if use_gpu:
        require_gpus(min(concurrency, len(source.shards)), "generate.concurrency")
    rows = ray.data.from_items([{"path": s.path} for s in source.shards],
                               override_num_blocks=len(source.shards))
    rows = rows.map_batches(
        AmbiguityFilter, batch_size=1, num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0,
        compute=ray.data.ActorPoolStrategy(size=min(concurrency, len(source.shards))),
        fn_constructor_kwargs={"storage_root": storage.uri,
                               "classifier_dir": layout.classifier_dir(classifier_run),
                               "source_dir": source_dir, "dest_dir": dest_dir, "tau": tau,
                               "use_gpu": use_gpu, **_image_format(source)})
    results = rows.take_all()
    total = sum(int(r["total"]) for r in results)
    kept = sum(int(r["count"]) for r in results)
    if kept == 0:
        raise InputError(f"the ambiguity filter kept no sample of {total} at tau={tau}: the "
                         f"plain classifier is sure of every one; raise generate.filter_tau")
    manifest = Manifest(
        kind="synthetic", split="labelmix-filtered", image_size=source.image_size,
        channels=source.channels, class_names=source.class_names,
        shards=sorted((ShardInfo.from_row(r) for r in results), key=lambda s: s.path),
        extra={**source.extra, "filter": settings, "kept": kept, "total": total,
               "kept_fraction": kept / total})
    write_manifest(storage, dest_dir, manifest)
    return manifest
