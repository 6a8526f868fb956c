"""Device placement, checked on the CPU with a simulated accelerator (tests/device_sim.py).

On a GPU, batches arrive on the device and any tensor built without `device=` is on the CPU;
mixing them crashes. Under `SimulatedAccelerator` the same mistake raises on the CPU, so these
tests run the real training loops (in real Ray Train workers), the sampler, the grid and the
scorer as a GPU worker would, and fail where a GPU would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch

import oodscale.classify.train as classify_train
import oodscale.diffusion.train as diffusion_train
from oodscale.classify.checkpoints import CARD, LoadedClassifier
from oodscale.classify.loss_table import LOSS_NAMES
from oodscale.classify.models import build_classifier
from oodscale.classify.step import oe_step
from oodscale.cli import main
from oodscale.config import load_config
from oodscale.data.shards import read_manifest
from oodscale.data.streams import endless_batches, read_shards, to_model_input
from oodscale.distributed import make_accelerator
from oodscale.outlier_sources import synthetic_dirname
from oodscale.outliers import OutlierStream
from oodscale.runtime import layout_for
from tests.device_sim import SimulatedAccelerator
from tests.support import CONFIG, NO_QUALITY

pytestmark = pytest.mark.integration
SMALL = [
    "data.ood_sets=[openset,gaussian]", "data.ood_samples=24", "data.shard_size=200",
    "diffusion.block_out_channels=[8,8]", "diffusion.epochs=1", "diffusion.batch_size=32",
    "generate.num_shards=2", "generate.samples_per_shard=16", "generate.steps=2",
    "generate.concurrency=1", "generate.grid_per_class=1",
    "train.losses=[arcface]", "train.outliers=[labelmix,noise]", "train.epochs=1",
    "train.steps_per_epoch=2", "train.num_workers=1", "train.batch_size=16",
    "train.outlier_batch_size=8", "train.embedding_dim=8", "train.augment.crop_padding=2",
    "evaluate.scores=[msp,maxlogit,energy,maxcos,knn,mahalanobis,pood:ViM,pood:ReAct,"
    "pood:NNGuide,pood:KNN,pood:KLMatching,pood:ASH]", *NO_QUALITY,
]
SOURCES = ["none", "labelmix", "labelmix-w1", "labelmix-filtered", "noise", "pixelmix"]


def simulated(loop):
    """A Ray Train loop run as on a GPU worker: cross-device ops raise."""

    def loop_on_simulated_gpu(config):
        with SimulatedAccelerator():
            loop(config)

    return loop_on_simulated_gpu


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory, ray_cluster):
    """Prepare and generate for real; train the DDPM and the classifiers under the simulation."""
    root = tmp_path_factory.mktemp("sim")
    cfg = load_config(CONFIG, [f"storage.root={root}", *SMALL])
    layout = layout_for(cfg)
    overrides = [f"storage.root={root}", *SMALL]
    assert main(["prepare", CONFIG, *overrides]) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusion_train, "diffusion_loop", simulated(diffusion_train.diffusion_loop))
        assert main(["train-diffusion", CONFIG, *overrides]) == 0
    assert main(["generate", CONFIG, *overrides]) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classify_train, "classifier_loop", simulated(classify_train.classifier_loop))
        assert main(["train", CONFIG, *overrides]) == 0
    return cfg, layout


def test_the_simulation_fails_like_a_gpu_on_a_host_tensor_beside_a_batch():
    with SimulatedAccelerator():
        labels = torch.zeros(4, dtype=torch.long).to("cpu")  # as a batch on the worker's device
        with pytest.raises(RuntimeError, match="same device"):
            torch.cat([labels, torch.full((3,), -1, dtype=torch.long)])  # 51375f2's line 108
        torch.cat([labels, torch.full((3,), -1, dtype=torch.long, device="cpu")])
        model = build_classifier("smallcnn", "arcface", 1, 16, 6, 8)
        images = torch.zeros(2, 1, 16, 16).to("cpu")
        with pytest.raises(RuntimeError, match="same device"):
            model.embed_and_logits(images)  # the model never moved
        model.to("cpu")
        model.embed_and_logits(images)


def test_training_loops_ran_as_on_a_gpu_worker(sim_run):
    cfg, layout = sim_run
    storage = layout.storage
    assert storage.exists(f"{layout.diffusion_dir}/model.json")
    for source in ("labelmix", "noise"):
        assert storage.exists(f"{layout.classifier_dir(f'arcface-{source}-s0')}/{CARD}"), source


@pytest.mark.parametrize("source", SOURCES)
def test_one_oe_step_of_every_source_keeps_every_tensor_on_the_device(sim_run, source):
    cfg, layout = sim_run
    device = torch.device("cpu")
    id_data, manifest = read_shards(layout.storage, layout.id_split("train"))
    syn_data, _ = read_shards(layout.storage, layout.synthetic_variant(
        synthetic_dirname(cfg.generate.guidance)))
    with SimulatedAccelerator() as sim:
        accelerator = make_accelerator("no", use_gpu=False)
        model = build_classifier("smallcnn", "arcface", 1, 16, len(manifest.class_names), 8)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        before = [p.detach().clone() for p in model.parameters()]
        batches = endless_batches(id_data.iterator(), 16, 0, device)
        synthetic = (endless_batches(syn_data.iterator(), 8, 1, device)
                     if source.startswith("labelmix") else None)
        stream = OutlierStream(source, 8, len(manifest.class_names), 2, device, synthetic)
        batch = next(batches)
        assert sim.on_device(batch["image"]) and sim.on_device(batch["label"])
        x, y = to_model_input(batch["image"]), batch["label"]
        outliers = stream.next(x, y)
        assert (outliers is None) == (source == "none")
        figures = oe_step(model, optimizer, accelerator, x, y, outliers, 0.5)
        assert sim.on_device(figures) and torch.isfinite(figures).all()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(),
                                                             strict=True))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_one_oe_step_of_every_loss_head_keeps_every_tensor_on_the_device(sim_run, loss):
    cfg, layout = sim_run
    id_data, manifest = read_shards(layout.storage, layout.id_split("train"))
    with SimulatedAccelerator() as sim:
        accelerator = make_accelerator("no", use_gpu=False)
        model = build_classifier("smallcnn", loss, 1, 16, len(manifest.class_names), 8)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        batch = next(endless_batches(id_data.iterator(), 16, 0, "cpu"))
        x, y = to_model_input(batch["image"]), batch["label"]
        stream = OutlierStream("noise", 8, len(manifest.class_names), 2, "cpu")
        figures = oe_step(model, optimizer, accelerator, x, y, stream.next(x, y), 0.5)
        assert sim.on_device(figures) and torch.isfinite(figures).all()


def test_sampling_and_the_grid_run_on_the_simulated_device(sim_run, tmp_path):
    from oodscale.diffusion.generate import draw_grid
    from oodscale.diffusion.generators import model_card
    from oodscale.diffusion.sample import ShardSampler

    cfg, layout = sim_run
    card = model_card(cfg, layout)
    storage = layout.storage
    class_map = list(range(card["num_classes"]))
    with SimulatedAccelerator():
        sampler = ShardSampler(storage.uri, layout.diffusion_dir, str(tmp_path),
                               cfg.generate.model_dump(), card, class_map,
                               cfg.data.image_size, cfg.seed, use_gpu=False)
        out = sampler({"shard": np.array([0])})
        grid = draw_grid(storage.uri, layout.diffusion_dir, str(tmp_path),
                         cfg.generate.model_dump(), card, card["class_names"], class_map,
                         cfg.seed, use_gpu=False)
    assert out["count"] == [cfg.generate.samples_per_shard]
    # The same shard as the real generate stage drew: placement changes nothing else.
    assert out["sha256"][0] == read_manifest(storage, layout.synthetic_variant(
        synthetic_dirname(cfg.generate.guidance))).shards[0].sha256
    assert Path(grid).stat().st_size > 500


def test_knn_mahalanobis_fit_and_scoring_run_on_the_simulated_device(sim_run):
    from oodscale.evaluate.score import Scorer, fit_train_features

    cfg, layout = sim_run
    storage = layout.storage
    directory = layout.classifier_dir("arcface-labelmix-s0")
    test_dir = layout.id_split("test")
    manifest = read_manifest(storage, test_dir)
    from oodscale.data.shards import load_arrays

    images, _ = load_arrays(storage, test_dir)
    batch = {"image": images[:20].transpose(0, 3, 1, 2), "label": np.zeros(20, dtype=np.int64),
             "dataset": np.full(20, "id"), "key": np.array([f"test-{i}" for i in range(20)])}
    with SimulatedAccelerator() as sim:
        fitted = fit_train_features(storage.uri, directory, layout.id_split("train"), 64, False,
                                    list(cfg.evaluate.scores))
        scorer = Scorer(storage.uri, {"cell": directory}, list(cfg.evaluate.scores),
                        {"cell": ray.put(fitted)})
        assert sim.on_device(scorer.fitted["cell"].features.train_normed)
        scored = scorer(batch)
    plain = LoadedClassifier(storage.uri, directory)
    logits, _ = plain.embed(batch["image"])
    np.testing.assert_array_equal(scored["pred::cell"], logits.argmax(1).numpy())
    assert manifest.num_samples >= 20
    for name in cfg.evaluate.scores:
        assert np.isfinite(scored[f"score::cell::{name}"]).all(), name


def test_a_gpu_pool_larger_than_the_cluster_is_refused_on_the_jobs_own_ray(
        ray_cluster, monkeypatch, capsys):
    from oodscale import runtime

    monkeypatch.setattr(runtime, "_LOCAL_RAY_STARTED", True)  # no autoscaler will add GPUs
    with pytest.raises(ValueError, match="generate.concurrency=2 asks for 2 one-GPU actors"):
        runtime.require_gpus(2, "generate.concurrency")
    monkeypatch.setattr(runtime, "_LOCAL_RAY_STARTED", False)  # a joined cluster may autoscale
    runtime.require_gpus(2, "generate.concurrency")
    assert "waiting for an autoscaler" in capsys.readouterr().out
