"""A miniature pipeline, every stage on a real local Ray cluster, checking each stage's files."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from oodscale.cli import main
from oodscale.data.shards import load_arrays, read_manifest
from oodscale.data.streams import CachedShards, training_set
from oodscale.runtime import open_storage
from tests.support import CONFIG

pytestmark = pytest.mark.integration

TINY = [
    "data.ood_sets=[openset,textures,gaussian]", "data.ood_samples=40", "data.shard_size=200",
    "diffusion.block_out_channels=[8,8]", "diffusion.epochs=2", "diffusion.batch_size=32",
    "diffusion.quality_per_class=1",
    "generate.num_shards=3", "generate.samples_per_shard=12", "generate.steps=3",
    "generate.concurrency=2", "generate.grid_per_class=2", "generate.filter_tau=0.99",
    "train.outliers=[none,labelmix,labelmix-filtered]",
    "train.epochs=2", "train.batch_size=32", "train.outlier_batch_size=8",
    "train.embedding_dim=16", "evaluate.scores=[msp,maxlogit,energy,maxcos]",
]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("runs")
    overrides = [f"storage.root={root}", *TINY]
    for stage in ("prepare", "train-diffusion", "generate", "train", "evaluate"):
        assert main([stage, CONFIG, *overrides]) == 0, stage
    return root, overrides


def test_prepare_wrote_id_and_ood_shards(run_root):
    root, _ = run_root
    storage = open_storage(str(root))
    train = read_manifest(storage, storage.path("digits", "data", "id", "train"))
    test = read_manifest(storage, storage.path("digits", "data", "id", "test"))
    assert train.kind == "id" and train.class_names == ["0", "1", "2", "3", "4", "5"]
    assert train.image_size == 16 and train.channels == 1
    val = read_manifest(storage, storage.path("digits", "data", "id", "val"))
    assert train.num_samples + val.num_samples + test.num_samples == 1083  # digits 0-5
    assert val.num_samples == 76 and val.extra["val_fraction"] == 0.1  # 10 % of the 758
    for name in ("openset", "textures", "gaussian"):
        ood = read_manifest(storage, storage.path("digits", "data", "ood", name))
        assert ood.kind == "ood" and ood.num_samples == 40
        assert ood.extra["group"] == ("near" if name == "openset" else "far")
    # OOD validation sets: the held-out digits the open-set test set did not draw, fresh noise.
    test_keys = {s.sha256 for s in read_manifest(storage, storage.path(
        "digits", "data", "ood", "openset")).shards}
    for name in ("openset", "gaussian"):
        val_ood = read_manifest(storage, storage.path("digits", "data", "ood-val", name))
        assert val_ood.extra["purpose"] == "ood-val" and val_ood.num_samples == 40
        assert not test_keys & {s.sha256 for s in val_ood.shards}
    val_images, _ = load_arrays(storage, storage.path("digits", "data", "ood-val", "openset"))
    test_images, _ = load_arrays(storage, storage.path("digits", "data", "ood", "openset"))
    assert not {im.tobytes() for im in val_images} & {im.tobytes() for im in test_images}
    assert not (root / "digits" / "data" / "ood-val" / "textures").exists()  # no honest twin


def test_diffusion_saved_with_safetensors(run_root):
    root, _ = run_root
    unet = root / "digits" / "diffusion" / "unet"
    assert (unet / "diffusion_pytorch_model.safetensors").is_file()
    card = json.loads((root / "digits" / "diffusion" / "model.json").read_text())
    assert card["num_classes"] == 6 and len(card["model_hash"]) == 16
    assert card["ema_decay"] == 0.999 and card["ema_steps"] == card["steps"] > 0
    quality = card["quality"]  # diffusion.quality_per_class=1: measured in a Ray task
    assert quality["class_samples"] == quality["mix_samples"] == 6
    assert quality["frechet_distance"] >= 0 and 0 <= quality["mix_pair_mass"] <= 1


def test_generate_wrote_provenance_and_grid(run_root):
    root, overrides = run_root
    storage = open_storage(str(root))
    syn_dir = storage.path("digits", "synthetic-w3")
    manifest = read_manifest(storage, syn_dir)
    assert manifest.kind == "synthetic" and manifest.num_samples == 36
    assert (root / "digits" / "synthetic-w3" / "grid.png").stat().st_size > 1000
    from oodscale.data.shards import load_arrays

    # how between their classes the drawn outliers are, read by the run's reference classifier
    quality = manifest.extra["quality"]
    assert quality["mix_samples"] == 36 and 0 <= quality["mix_weaker_share"] <= 0.5
    assert (root / "digits" / "reference" / "classifier.json").is_file()
    images, metas = load_arrays(storage, syn_dir)
    assert images.shape == (36, 16, 16, 1)
    for meta in metas:
        assert {"a", "b", "lam", "guidance", "seed", "model"} <= set(meta)
        assert meta["a"] != meta["b"] and meta["lam"] == 0.5

    # Resume: drop the last shard and rerun; it is redrawn bit-identically from its seed alone.
    last = manifest.shards[-1]
    (root / "digits" / "synthetic-w3" / last.path).unlink()
    manifest.shards = manifest.shards[:-1]
    from oodscale.data.shards import write_manifest

    write_manifest(storage, syn_dir, manifest)
    assert main(["generate", CONFIG, *overrides]) == 0
    again = read_manifest(storage, syn_dir)
    assert [s.sha256 for s in again.shards][-1] == last.sha256
    assert again.num_samples == 36


def test_train_wrote_a_checkpoint_per_grid_cell(run_root):
    root, _ = run_root
    for run in ("softmax-none-s0", "softmax-labelmix-s0", "arcface-none-s0",
                "arcface-labelmix-s0", "softmax-labelmix-filtered-s0",
                "arcface-labelmix-filtered-s0"):
        directory = root / "digits" / "classifiers" / run
        assert (directory / "model.safetensors").is_file()
        card = json.loads((directory / "classifier.json").read_text())
        assert card["run"] == run and card["epoch"] == 1


def test_evaluate_wrote_scores_results_and_report(run_root):
    root, _ = run_root
    eval_dir = root / "digits" / "eval"
    scores = pd.read_parquet(eval_dir / "scores.parquet")
    assert {"loss", "outliers", "seed", "score_name", "dataset", "is_ood", "score", "label",
            "pred"} <= set(scores.columns)
    assert set(scores["dataset"]) == {"id", "openset", "textures", "gaussian"}
    assert scores.loc[scores["dataset"] == "id", "label"].between(0, 5).all()
    assert (scores.loc[scores["is_ood"], "label"] == -1).all()
    results = pd.read_parquet(eval_dir / "results.parquet")
    assert len(results) == 6 * 4 * 3  # runs x scores x OOD sets
    assert set(results["group"]) == {"near", "far"}
    for col in ("fpr95", "auroc", "aupr_in", "aupr_out", "id_acc"):
        assert results[col].between(0, 100).all(), col
    # every image carries its key, so the pairs of two classifiers are explicit
    keys = scores.groupby(["run", "score_name", "dataset"])["sample"].apply(frozenset)
    assert keys.groupby(level="dataset").nunique().eq(1).all()
    assert not scores.duplicated(["run", "score_name", "dataset", "sample"]).any()
    from oodscale.evaluate.claims import CLAIM_COLUMNS
    from oodscale.evaluate.intervals import COMPARISON_COLUMNS

    comparisons = pd.read_parquet(eval_dir / "comparisons.parquet")
    assert list(comparisons.columns) == COMPARISON_COLUMNS
    assert set(comparisons["protocol"]) == {"paper", "openood"}
    assert set(comparisons["comparison"]) == {"vs_none", "vs_softmax"}
    assert (comparisons["ci_low"] <= comparisons["ci_high"]).all()
    claims = pd.read_parquet(eval_dir / "claims.parquet")
    assert list(claims.columns) == CLAIM_COLUMNS
    assert set(claims["verdict"]) <= {"holds", "fails", "undecided"}
    report = (eval_dir / "report.md").read_text()
    assert "OOD" in report and "95 % CI" in report and "## Test sets" in report
    # The primary scores were chosen on the validation sets, which report.md says.
    val = pd.read_parquet(eval_dir / "val_results.parquet")
    assert set(val["ood_set"]) == {"openset", "gaussian"} and len(val) == 6 * 4 * 2
    assert "validation sets alone" in report and "`openset`" in report
    assert "## Generator sample quality" in report
    assert "## Drawn outliers, read by the reference classifier" in report
    assert list((eval_dir / "plots").glob("*.png"))


def test_claims_command_prints_the_decided_claims(run_root, capsys, tmp_path):
    root, overrides = run_root
    assert main(["claims", CONFIG, *overrides]) == 0
    out = capsys.readouterr().out
    assert "label-mixup OE improves each loss" in out and "metric losses beat softmax" in out
    assert any(v in out for v in ("holds", "fails", "undecided"))
    # an experiment without evaluate's files says what to run
    assert main(["claims", CONFIG, f"storage.root={tmp_path}"]) == 1
    assert "run `oodscale evaluate`" in capsys.readouterr().err


def test_ambiguity_filter_keeps_unsure_samples_with_their_score(run_root):
    root, _ = run_root
    storage = open_storage(str(root))
    filtered_dir = storage.path("digits", "synthetic-w3-filtered")
    manifest = read_manifest(storage, filtered_dir)
    assert manifest.extra["total"] == 36
    assert 0 < manifest.extra["kept"] <= 36
    assert manifest.extra["kept_fraction"] == manifest.extra["kept"] / 36
    from oodscale.data.shards import load_arrays

    _, metas = load_arrays(storage, filtered_dir)
    assert len(metas) == manifest.extra["kept"]
    assert all(m["filter_msp"] <= 0.99 and m["filter_tau"] == 0.99 for m in metas)
    assert all(m["filter_model"] == "softmax-none-s0" for m in metas)


def test_a_finetuned_cell_starts_from_its_finished_none_cell(run_root, tmp_path):
    from safetensors.torch import load_file

    root, _ = run_root
    other = tmp_path / "runs"
    for part in ("data", "diffusion", "synthetic-w3", "classifiers/softmax-none-s0"):
        shutil.copytree(root / "digits" / part, other / "digits" / part)
    overrides = [f"storage.root={other}", *TINY, "train.losses=[softmax]",
                 "train.outliers=[none,labelmix-ft]", "train.finetune_epochs=1",
                 "train.finetune_lr=1e-9"]
    assert main(["train", CONFIG, *overrides]) == 0
    tuned_dir = other / "digits" / "classifiers" / "softmax-labelmix-ft-s0"
    card = json.loads((tuned_dir / "classifier.json").read_text())
    assert card["finetunes"] == "softmax-none-s0" and card["epoch"] == 0 and card["lr"] == 1e-9

    def parameters(run_dir) -> dict:
        weights = load_file(str(run_dir / "model.safetensors"))
        return {k: v for k, v in weights.items()
                if "running" not in k and "num_batches" not in k}

    tuned, start = parameters(tuned_dir), parameters(root / "digits" / "classifiers" /
                                                     "softmax-none-s0")
    scratch = parameters(root / "digits" / "classifiers" / "softmax-labelmix-s0")
    # at lr 1e-9 fine-tuning leaves the none cell's weights; OE from scratch does not
    assert max((tuned[k] - start[k]).abs().max().item() for k in start) < 1e-5
    assert max((scratch[k] - start[k]).abs().max().item() for k in start) > 1e-2


def test_rerun_skips_finished_stages(run_root, capsys):
    root, overrides = run_root
    assert main(["train", CONFIG, *overrides]) == 0
    assert "every classifier already trained" in capsys.readouterr().out


def test_a_set_over_the_cache_streams_beside_a_cached_one_in_one_worker_group(run_root,
                                                                             tmp_path):
    root, _ = run_root
    other = tmp_path / "runs"
    for part in (root / "digits").iterdir():
        if part.name == "data" or part.name.startswith(("synthetic", "diffusion")):
            shutil.copytree(part, other / "digits" / part.name)
    overrides = [f"storage.root={other}", *TINY, "train.losses=[arcface]",
                 "train.outliers=[labelmix]", "train.cache_mb=0.05"]
    # 0.05 MB: each of the 2 workers' half of the 682 ID images (87 KB) streams through Ray
    # Train's split; the 36 synthetic outliers (9 KB) are read whole in each worker
    storage = open_storage(str(other))
    assert not isinstance(training_set(storage, f"{other}/digits/data/id/train", 2, 0.05)[0],
                          CachedShards)
    assert isinstance(training_set(storage, f"{other}/digits/synthetic-w3", 2, 0.05)[0],
                      CachedShards)
    assert main(["train", CONFIG, *overrides]) == 0
    card = json.loads((other / "digits" / "classifiers" / "arcface-labelmix-s0" /
                       "classifier.json").read_text())
    assert card["epoch"] == 1 and math.isfinite(card["train"]["loss"])
    assert card["train"]["oe_loss"] > 0  # the cached outliers reached the step


def test_grid_cells_share_one_worker_group_and_resume_from_its_checkpoint(run_root):
    root, overrides = run_root
    ray_train = root / "digits" / "ray_train"
    # One worker group for the unfiltered cells, one for the filtered: not one per cell.
    assert sorted(p.name for p in ray_train.iterdir() if "classifiers" in p.name) == [
        "digits-classifiers", "digits-classifiers-filtered"]
    # The filtered group's last checkpoint is its last cell's last epoch; a lost publication
    # of that cell is rebuilt from the checkpoint, not retrained.
    cell = root / "digits" / "classifiers" / "arcface-labelmix-filtered-s0"
    original = (cell / "model.safetensors").read_bytes()
    shutil.rmtree(cell)
    assert main(["train", CONFIG, *overrides]) == 0
    card = json.loads((cell / "classifier.json").read_text())
    assert card["train"]["first_epoch"] == 2  # = train.epochs: nothing left to train
    assert (cell / "model.safetensors").read_bytes() == original
