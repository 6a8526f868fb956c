"""Sample quality of a class-conditional generator, read by a small reference classifier trained
on the same ID data (DESIGN.md: "a generator is measured, not assumed"):

(a) conditional fidelity: the reference's accuracy on class-conditional samples (beside its
    accuracy on the real ID test images, the ceiling it can reach);
(b) a Fréchet distance between the samples and the ID test images in the reference's embedding
    (FID's formula in a feature space that knows these classes: Inception knows no digits);
(c) for label-mixup samples of classes (a, b), the probability mass the reference puts on a and
    on b, their sum, and the entropy of its prediction: how "between" the two the samples are.

No Ray, no storage: arrays in, a dict of floats out, for the diffusion card (`model.json`).
Images are uint8 N×C×H×W, as the shards hold them.
"""

from __future__ import annotations

import json
import math
import tempfile
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodscale.classify.cards import CARD
from oodscale.classify.checkpoints import load_classifier, save_classifier
from oodscale.classify.models import OODClassifier, build_classifier
from oodscale.data.shards import iter_raw_samples, read_manifest, sample_image, shard_paths
from oodscale.data.streams import read_rows, to_model_input
from oodscale.distributed import publish_dir
from oodscale.errors import InputError
from oodscale.runtime import RunLayout, Storage, derive_seed, open_storage


def train_reference(images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int = 10,
                    batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                    device: torch.device | str = "cpu", backbone: str = "smallcnn",
                    embedding_dim: int = 64) -> OODClassifier:
    """A softmax classifier of the project's backbones on the ID images, in eval mode."""
    torch.manual_seed(seed)
    _, channels, size, _ = images.shape
    model = build_classifier(backbone, "softmax", channels, size, num_classes,
                             embedding_dim).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    x_all = torch.as_tensor(images)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    steps = max(1, len(x_all) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr,
                                                   total_steps=epochs * steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for i in range(steps):
            rows = order[i * batch_size:(i + 1) * batch_size]
            x = to_model_input(x_all[rows].to(device))
            _, _, loss = model(x, y_all[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: OODClassifier, images: np.ndarray, batch_size: int = 512,
            ) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities N×K, embeddings N×D) of uint8 images, as float64 arrays."""
    device = next(model.parameters()).device
    probs, embeddings = [], []
    for start in range(0, len(images), batch_size):
        x = to_model_input(torch.as_tensor(images[start:start + batch_size]).to(device))
        logits, emb = model.embed_and_logits(x)
        probs.append(logits.float().softmax(1).cpu().double().numpy())
        embeddings.append(emb.float().cpu().double().numpy())
    return np.concatenate(probs), np.concatenate(embeddings)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between two feature sets (rows)."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        raise InputError("a Fréchet distance needs at least two rows on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # a singular product: nudge both, as FID code does
        eps = 1e-6 * np.eye(len(cov_a))
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    root = np.real(root)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    return max(value, 0.0)  # rounding can leave a tiny negative for identical sets


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(probs * np.log(p)).sum(1)


def mixup_betweenness(probs: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """How between classes a and b the reference finds label-mixup samples: the mean mass on
    a, on b and on both; the mean share of the pair's mass on the weaker class (0.5: evenly
    between; 0: a clean a or b); the mean entropy and its ratio to log K."""
    rows = np.arange(len(probs))
    pa, pb = probs[rows, a], probs[rows, b]
    pair = pa + pb
    h = entropy(probs)
    return {"mix_mass_a": float(pa.mean()), "mix_mass_b": float(pb.mean()),
            "mix_pair_mass": float(pair.mean()),
            "mix_weaker_share": float((np.minimum(pa, pb) / np.maximum(pair, 1e-12)).mean()),
            "mix_entropy": float(h.mean()),
            "mix_entropy_ratio": float(h.mean() / math.log(probs.shape[1]))}


def sample_quality(reference: OODClassifier, test_images: np.ndarray, test_labels: np.ndarray,
                   class_images: np.ndarray, class_labels: np.ndarray,
                   mix_images: np.ndarray | None = None, mix_a: np.ndarray | None = None,
                   mix_b: np.ndarray | None = None) -> dict[str, Any]:
    """(a), (b) and (c) of the module docstring for one generator's samples, in one dict:
    accuracies in %, the Fréchet distance in the reference's embedding, the mixup figures."""
    test_probs, test_emb = predict(reference, test_images)
    probs, emb = predict(reference, class_images)
    out: dict[str, Any] = {
        "reference_test_accuracy": 100 * float((test_probs.argmax(1) == test_labels).mean()),
        "conditional_accuracy": 100 * float((probs.argmax(1) == class_labels).mean()),
        "frechet_distance": frechet_distance(emb, test_emb),
        "class_samples": len(class_images), "test_images": len(test_images)}
    if mix_images is not None:
        mix_probs, _ = predict(reference, mix_images)
        out.update(mixup_betweenness(mix_probs, np.asarray(mix_a), np.asarray(mix_b)),
                   mix_samples=len(mix_images))
    return out


def draw_quality_samples(model, gen, class_map: list[int], per_class: int, seed: int,
                         device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """`per_class` class-conditional samples of each ID class and as many label-mixup ones, as
    the generate stage draws them (`gen`: its GenerateConfig: sampler, steps, guidance, mode,
    λ); uint8 images at the generator's size. `class_map[k]` is ID class k's generator index."""
    from oodscale.data.streams import from_model_output
    from oodscale.diffusion.classmap import to_generator_labels
    from oodscale.diffusion.mixup import one_hot
    from oodscale.diffusion.sample import draw_labelmix, sample_images, scheduler_for

    classes = len(class_map)
    labels = np.repeat(np.arange(classes), per_class)
    images = []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(labels), gen.batch_size):
        part = torch.as_tensor(labels[start:start + gen.batch_size])
        y = to_generator_labels(one_hot(part, classes), class_map, model.num_classes)
        drawn = sample_images(model, y, gen.guidance, scheduler_for(model, gen), generator,
                              device)
        images.append(from_model_output(drawn))
    mix, metas = draw_labelmix(model, gen, class_map, seed + 1, len(labels), device)
    chw = (0, 3, 1, 2)  # the samplers return B×H×W×C, as PNG shards take them
    return {"class_images": np.concatenate(images).transpose(chw), "class_labels": labels,
            "mix_images": mix.transpose(chw),
            "mix_a": np.array([m["a"] for m in metas]), "mix_b": np.array([m["b"] for m in metas])}


REFERENCE_EPOCHS = 15  # the reference classifier's epochs over the ID training split
REFERENCE_DESCRIPTION = f"smallcnn softmax, {REFERENCE_EPOCHS} epochs on the ID training split"


def reference_classifier(storage: Storage, layout: RunLayout, run_seed: int,
                         device: torch.device | str) -> OODClassifier:
    """The run's reference classifier, trained the first time a quality figure needs it and
    published under `<run>/reference`, so the DDPM's card and every generation run are read by
    the same classifier (and a rerun does not train it again)."""
    directory = layout.reference_dir
    if storage.exists(f"{directory}/{CARD}"):
        with tempfile.TemporaryDirectory() as tmp:
            model, _ = load_classifier(storage.fetch_dir(directory, Path(tmp)))
        return model.to(device)
    manifest = read_manifest(storage, layout.id_split("train"))
    train = read_rows(storage, layout.id_split("train"))
    classes = len(manifest.class_names)
    seed = derive_seed(run_seed, "quality")
    model = train_reference(train["image"].numpy(), train["label"].numpy(), classes,
                            epochs=REFERENCE_EPOCHS, seed=seed, device=device)
    card = {"loss": "softmax", "outliers": "none", "seed": seed, "run": "reference",
            "backbone": "smallcnn", "embedding_dim": 64, "head_options": {},
            "num_classes": classes, "class_names": manifest.class_names,
            "image_size": manifest.image_size, "channels": manifest.channels,
            "epochs": REFERENCE_EPOCHS, "purpose": REFERENCE_DESCRIPTION}
    with tempfile.TemporaryDirectory() as tmp:
        save_classifier(model, card, Path(tmp))
        publish_dir(storage, tmp, directory, last=(CARD,))
    return model


def measure_stored_ddpm(storage_root: str, cfg_dict: dict[str, Any], card: dict[str, Any],
                        use_gpu: bool) -> dict[str, Any]:
    """The quality figures of the run's published DDPM, for its card: the run's reference
    classifier, `diffusion.quality_per_class` class-conditional and as many label-mixup samples
    drawn as `generate` would draw them, the ID test split to compare with. Runs where a Ray
    task puts it (a GPU worker when training uses GPUs)."""
    from oodscale.config import ExperimentConfig
    from oodscale.devices import worker_device
    from oodscale.diffusion.generators import load_generator
    from oodscale.diffusion.sample import sampling_autocast

    cfg = ExperimentConfig.model_validate(cfg_dict)
    storage = open_storage(storage_root)
    layout = RunLayout(storage, cfg.name)
    device = worker_device(use_gpu)
    test = read_rows(storage, layout.id_split("test"))
    reference = reference_classifier(storage, layout, cfg.seed, device)
    model = load_generator(storage, layout.diffusion_dir, card).to(device)
    gen = cfg.generate
    with sampling_autocast(device, gen.mixed_precision):
        drawn = draw_quality_samples(model, gen, list(range(card["num_classes"])),
                                     cfg.diffusion.quality_per_class,
                                     derive_seed(cfg.seed, "quality-samples"), device)
    figures = sample_quality(reference, test["image"].numpy(), test["label"].numpy(), **drawn)
    return {**figures, "reference": REFERENCE_DESCRIPTION,
            "sampling": {"sampler": gen.sampler, "steps": gen.steps, "guidance": gen.guidance,
                         "mode": gen.mode, "lam": gen.lam.model_dump()}}


def measure_outliers(storage_root: str, experiment: str, run_seed: int, directory: str,
                     limit: int, use_gpu: bool) -> dict[str, Any]:
    """(c) of the module docstring for the outliers a generation run drew: the first `limit`
    samples of its shards (in shard order) read by the run's reference classifier."""
    from oodscale.devices import worker_device

    storage = open_storage(storage_root)
    layout = RunLayout(storage, experiment)
    reference = reference_classifier(storage, layout, run_seed, worker_device(use_gpu))
    images, a, b = [], [], []
    shards = shard_paths(storage, directory, read_manifest(storage, directory))
    samples = chain.from_iterable(iter_raw_samples(storage, path) for path in shards)
    for sample in islice(samples, limit):
        meta = json.loads(sample["json"])
        images.append(sample_image(sample).transpose(2, 0, 1))
        a.append(int(meta["a"]))
        b.append(int(meta["b"]))
    probs, _ = predict(reference, np.stack(images))
    return {**mixup_betweenness(probs, np.array(a), np.array(b)), "mix_samples": len(images),
            "reference": REFERENCE_DESCRIPTION}
