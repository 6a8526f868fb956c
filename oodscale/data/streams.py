"""Streaming shards into Ray Train workers with equal step counts on every rank.

Ray Data reads the WebDataset shards (local, s3://, gs://) and Ray Train splits the rows
equally across ranks. Each rank then sees the same number of *full* batches per pass, so DDP
ranks never wait on one another. Ray Data's local shuffle buffer can emit short batches
mid-stream (ray issue 66085), which would desynchronise ranks; we shuffle instead by mixing a
window of full batches, which keeps the batch count exact.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from oodscale.data.shards import decode_png, read_manifest, shard_paths
from oodscale.runtime import Storage


def _decode_sample(sample: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Ray Data webdataset decoder: raw tar members → image (C×H×W uint8) and label.

    Labels are checked here, on the host, once per read, so training steps can trust them
    without a host sync (-1 marks rows without an ID class: OOD and synthetic samples).
    """
    image = decode_png(sample["png"]).transpose(2, 0, 1)
    meta = json.loads(sample["json"])
    label = int(meta.get("label", -1))
    if not -1 <= label < num_classes:
        raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has "
                         f"label {label}, outside [0, {num_classes}) of its manifest's classes; "
                         f"the shard does not belong to this manifest: rerun `oodscale prepare`")
    return {"image": np.ascontiguousarray(image), "label": label}


def read_shards(storage: Storage, directory: str, hint: str = "run `oodscale prepare`"):
    """A Ray Dataset of {image, label} rows over the shards a manifest lists."""
    import ray.data

    manifest = read_manifest(storage, directory, hint)
    paths = shard_paths(storage, directory, manifest)
    if not paths:
        raise ValueError(f"{storage.uri_of(directory)} lists no shards; {hint}")
    decoder = functools.partial(_decode_sample, num_classes=len(manifest.class_names))
    return ray.data.read_webdataset(paths, filesystem=storage.fs, decoder=decoder), manifest


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [-1, 1], the range both the DDPM and the classifiers use."""
    return images.float().div(127.5).sub(1.0)


def from_model_output(images: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] (B×C×H×W) → uint8 B×H×W×C for PNG shards."""
    x = images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def endless_batches(shard, batch_size: int, seed: int, device: torch.device | str,
                    window: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """Full batches on `device` forever: pass after pass over this rank's split, shuffled
    within windows. This is where every training batch meets its device: Ray Data moves it
    (`iter_torch_batches(device=...)`, never Ray's implicit "auto"), and the shuffle stays on
    that device.
    """
    gen = torch.Generator().manual_seed(seed)  # host: the order is the same on CPU and GPU
    while True:
        produced = 0
        pending: list[dict[str, torch.Tensor]] = []
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              device=device):
            pending.append(batch)
            if len(pending) == window:
                yield from _mix(pending, gen)
                produced += len(pending)
                pending = []
        if pending:
            yield from _mix(pending, gen)
            produced += len(pending)
        if produced == 0:
            raise ValueError(f"this rank's data split has fewer rows than one batch of "
                             f"{batch_size}; lower the batch size or the number of workers")


def _mix(batches: list[dict[str, torch.Tensor]], gen: torch.Generator,
         ) -> Iterator[dict[str, torch.Tensor]]:
    size = len(batches[0]["label"])
    joined = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    order = torch.randperm(len(joined["label"]), generator=gen).to(joined["label"].device)
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        yield {k: v[idx] for k, v in joined.items()}
