"""The tiny experiment the fault tests interrupt, and what they compare (tests/test_kills.py,
tests/test_multinode.py). The clean reference run is the session fixture `tiny_reference`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from oodscale.cli import main
from tests.support import CONFIG, NO_QUALITY

NUM_SHARDS = 6
TINY = [
    "data.ood_sets=[gaussian]", "data.ood_samples=20",
    "diffusion.block_out_channels=[8,8]", "diffusion.epochs=1", "diffusion.batch_size=64",
    f"generate.num_shards={NUM_SHARDS}", "generate.samples_per_shard=48", "generate.steps=10",
    "generate.concurrency=2", "generate.grid_per_class=1",
    "train.losses=[softmax]", "train.outliers=[labelmix]", "train.seeds=[0]",
    "train.epochs=3", "train.steps_per_epoch=60", "train.batch_size=32",
    "train.outlier_batch_size=8", "train.embedding_dim=16", "evaluate.scores=[msp,energy]",
    *NO_QUALITY,
]
RUN = "softmax-labelmix-s0"


def args(root: Path) -> list[str]:
    return [CONFIG, f"storage.root={root}", *TINY]


def build_reference(root: Path) -> Path:
    """The uninterrupted stages every interrupted one is compared with, bit for bit: a resumed
    classifier whose data is kept on the device skips the batches its checkpoint holds, so it
    equals an uninterrupted one (docs/operations.md)."""
    for stage in ("prepare", "train-diffusion", "generate", "train", "evaluate"):
        assert main([stage, *args(root)]) == 0, stage
    return root


def weights(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(root / "digits" / "classifiers" / RUN / "model.safetensors"))


def same_weights(root: Path, reference: Path) -> bool:
    import torch

    mine, theirs = weights(root), weights(reference)
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def listed(root: Path) -> list[dict]:
    """The synthetic shards the manifest lists now (none before it exists)."""
    found = sorted((root / "digits").glob("synthetic*/manifest.json"))
    if not found:
        return []
    try:
        return json.loads(found[0].read_text())["shards"]
    except (ValueError, FileNotFoundError):  # mid-rename
        return []


def synthetic(root: Path) -> Path:
    return sorted((root / "digits").glob("synthetic*"))[0]


def shard_bytes(root: Path) -> dict[str, bytes]:
    directory = synthetic(root)
    return {s["path"]: (directory / s["path"]).read_bytes() for s in listed(root)}


def copy(reference: Path, root: Path, parts: list[str]) -> Path:
    """A fresh experiment root holding `parts` (globs) of the reference's finished stages."""
    for part in parts:
        for source in (reference / "digits").glob(part):
            shutil.copytree(source, root / "digits" / source.name)
    return root


def card(root: Path) -> dict:
    return json.loads((root / "digits" / "classifiers" / RUN / "classifier.json").read_text())


def checkpointed(root: Path, group: str = "classifiers") -> bool:
    """Whether the `group` worker group (classifiers, diffusion) has a checkpoint Ray Train
    registered (a checkpoint directory exists before every rank has reported it; only a
    registered one is resumed)."""
    for snapshot in (root / "digits" / "ray_train").glob(f"*{group}*/"
                                                          "checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (ValueError, FileNotFoundError):  # mid-write
            continue
    return False
