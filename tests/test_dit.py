"""The DiT generator: label-mixup in its class-embedding space, the class map by name, and
generate → train → evaluate on a tiny random DiT + VAE saved in diffusers' layout (no downloads).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from oodscale.cli import main
from oodscale.config import ConfigError, load_config
from oodscale.diffusion.classmap import map_classes, read_class_list, to_generator_labels
from oodscale.diffusion.dit import DiTGenerator, SoftLabelEmbedding
from oodscale.diffusion.generators import content_hash
from oodscale.diffusion.mixup import mixup_labels, one_hot
from tests.dit_models import DIT_CLASSES, tiny_dit
from tests.support import CONFIG, NO_QUALITY, imagefolder

WNIDS = [f"n{i:08d}" for i in range(DIT_CLASSES)]
ID_WNIDS = ["n00000002", "n00000007", "n00000011"]


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("dit")
    tiny_dit().save(directory)
    (directory / "classes.txt").write_text("".join(f"{w} class {i}, alias\n"
                                                   for i, w in enumerate(WNIDS)))
    return directory


def _plain_dit(directory: Path):
    """The same weights as diffusers loads them, untouched by us: the reference."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(directory, subfolder="transformer").eval()


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 8, 8, generator=gen), torch.tensor([999, 500, 10][:n])


@torch.no_grad()
def test_one_hot_soft_labels_reproduce_the_dits_integer_labels_exactly(dit_dir):
    plain, ours = _plain_dit(dit_dir), DiTGenerator.from_directory(dit_dir)
    x, t = _inputs(3)
    classes = torch.tensor([0, 5, DIT_CLASSES - 1])
    expected = plain(x, timestep=t, class_labels=classes).sample[:, :4]
    got = ours.predict_noise(x, t, ours.condition(one_hot(classes, DIT_CLASSES)))
    assert torch.equal(got, expected)
    # The unconditional input is the DiT's own null class (index num_classes).
    null = plain(x, timestep=t, class_labels=torch.full((3,), DIT_CLASSES)).sample[:, :4]
    assert torch.equal(ours.predict_noise(x, t, ours.null_condition(3)), null)
    assert not torch.equal(null, expected)


@torch.no_grad()
def test_lambda_one_and_zero_give_the_two_classes_and_between_mixes_embeddings(dit_dir):
    plain, ours = _plain_dit(dit_dir), DiTGenerator.from_directory(dit_dir)
    x, t = _inputs(1)
    a, b = np.array([3]), np.array([8])

    def eps(lam: float, mode: str = "mix") -> torch.Tensor:
        y = mixup_labels(a, b, np.array([lam]), DIT_CLASSES, mode)
        return ours.predict_noise(x, t, ours.condition(y))

    for lam, cls in ((1.0, 3), (0.0, 8)):
        own = plain(x, timestep=t, class_labels=torch.tensor([cls])).sample[:, :4]
        assert torch.equal(eps(lam), own), lam
    assert not torch.equal(eps(0.5), eps(1.0)) and not torch.equal(eps(0.5), eps(0.0))
    # What every block embeds: λ·E[a] + (1−λ)·E[b] ("mix") and E[a] + E[b] ("sum").
    for block in ours.transformer.transformer_blocks:
        embedder = block.norm1.emb.class_embedder
        assert isinstance(embedder, SoftLabelEmbedding)
        table = embedder.embedding_table.weight
        for lam, mode, want in ((0.25, "mix", 0.25 * table[3] + 0.75 * table[8]),
                                (0.25, "sum", table[3] + table[8])):
            y = ours.condition(mixup_labels(a, b, np.array([lam]), DIT_CLASSES, mode))
            torch.testing.assert_close(embedder(y)[0], want)


def test_save_load_keeps_the_weights_and_the_hash(dit_dir, tmp_path):
    again = tmp_path / "again"
    DiTGenerator.from_directory(dit_dir).save(again)
    assert content_hash(again) == content_hash(dit_dir)
    loaded = DiTGenerator.from_directory(again)
    assert loaded.num_classes == DIT_CLASSES and loaded.latent_shape == (4, 8, 8)
    assert loaded.image_size == 16 and loaded.channels == 3
    assert loaded.schedule["beta_schedule"] == "linear" and not loaded.schedule["clip_sample"]


def test_id_classes_map_to_generator_indices_by_name(dit_dir):
    names = read_class_list(dit_dir / "classes.txt")
    assert names == WNIDS  # the first word of each line
    assert map_classes(ID_WNIDS, names) == [2, 7, 11]
    assert map_classes(["class 7"], [f"{w}, class {i}" for i, w in enumerate(WNIDS)]) == [7]
    with pytest.raises(ValueError, match="n99999999"):
        map_classes(["n00000002", "n99999999"], names)
    y = to_generator_labels(torch.tensor([[0.5, 0.5, 0.0]]), [2, 7, 11], DIT_CLASSES)
    assert y.shape == (1, DIT_CLASSES) and y[0, 2] == y[0, 7] == 0.5 and y.sum() == 1.0


def test_dit_config_needs_its_weights_and_a_known_generator():
    with pytest.raises(ConfigError, match="generate.pretrained"):
        load_config(CONFIG, ["generate.generator=dit"])
    with pytest.raises(ConfigError, match="ddpm, dit"):
        load_config(CONFIG, ["generate.generator=gan"])


def _id_folder(root: Path, per_class: int, seed: int) -> None:
    """Three wnid classes of coloured squares on noise: real files in ImageNet's layout."""
    rng = np.random.default_rng(seed)
    for c, wnid in enumerate(ID_WNIDS):
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (20, 20, 3), dtype=np.uint8)
            pixels[4:16, 4:16, c] = 230
            Image.fromarray(pixels).save(root / wnid / f"{wnid}_{i}.png")


@pytest.mark.integration
def test_generate_train_evaluate_on_a_tiny_dit(dit_dir, tmp_path, ray_cluster):
    data = tmp_path / "imagenet"
    _id_folder(data / "train", 12, seed=0)
    _id_folder(data / "val", 4, seed=1)
    root = tmp_path / "runs"
    overrides = [
        f"storage.root={root}", *imagefolder(data, 12), "data.shard_size=64",
        "data.ood_sets=[gaussian]", "data.near_ood=[]", "data.ood_samples=16",
        "generate.generator=dit", f"generate.pretrained={dit_dir}",
        f"generate.class_list={dit_dir / 'classes.txt'}", "generate.sampler=dpmsolver",
        "generate.steps=3", "generate.guidance=4", "generate.num_shards=2",
        "generate.samples_per_shard=8", "generate.batch_size=8", "generate.concurrency=1",
        "generate.grid_per_class=1", "generate.image_format=jpg", "generate.jpeg_quality=85",
        "generate.filter_tau=1.0", "train.losses=[softmax]",
        "train.outliers=[labelmix-filtered]", "train.seeds=[0]",
        "train.epochs=1", "train.batch_size=8", "train.outlier_batch_size=4",
        "train.num_workers=1", "train.embedding_dim=8", "evaluate.scores=[msp]", *NO_QUALITY]
    for stage in ("prepare", "train-diffusion", "generate", "train", "evaluate"):
        assert main([stage, CONFIG, *overrides]) == 0, stage
    run = root / "digits"
    assert not (run / "diffusion" / "unet").exists()  # nothing trained for a pretrained DiT
    card = json.loads((run / "diffusion" / "model.json").read_text())
    assert card["generator"] == "dit" and card["source"] == str(dit_dir)
    assert card["model_hash"] == content_hash(dit_dir) and card["num_classes"] == DIT_CLASSES

    from oodscale.data.shards import iter_raw_samples, load_arrays, read_manifest
    from oodscale.runtime import open_storage

    storage = open_storage(str(root))
    syn_dir = storage.path("digits", "synthetic-w4")
    manifest = read_manifest(storage, syn_dir)
    assert manifest.class_names == ID_WNIDS and manifest.extra["class_map"] == [2, 7, 11]
    assert manifest.image_size == 12 and manifest.channels == 3
    raw = next(iter_raw_samples(storage, f"{syn_dir}/{manifest.shards[0].path}"))
    assert "jpg" in raw and "png" not in raw and raw["jpg"][:2] == b"\xff\xd8"  # JPEG
    images, metas = load_arrays(storage, syn_dir)
    assert images.shape == (16, 12, 12, 3) and images.std() > 1.0
    assert all(m["model"] == card["model_hash"] and m["a"] != m["b"] for m in metas)
    assert {m["a"] for m in metas} <= {0, 1, 2}  # ID class indices; the map is in the manifest
    assert (run / "synthetic-w4" / "grid.png").stat().st_size > 500

    # The ambiguity filter's copy keeps the JPEG format (the plain classifier trained first).
    filtered = read_manifest(storage, storage.path("digits", "synthetic-w4-filtered"))
    raw = next(iter_raw_samples(storage, f"{syn_dir}-filtered/{filtered.shards[0].path}"))
    assert "jpg" in raw and filtered.extra["kept"] == 16

    results = pd.read_parquet(run / "eval" / "results.parquet")
    assert set(results["outliers"]) == {"none", "labelmix-filtered"}
    assert set(results["ood_set"]) == {"gaussian"}
    assert results["auroc"].between(0, 100).all()


def test_imagenet200_config_is_the_openood_setting_with_bring_your_own_paths():
    cfg = load_config(Path(CONFIG).parent / "imagenet200.yaml")
    assert cfg.generate.generator == "dit" and cfg.generate.image_format == "jpg"
    assert cfg.data.image_size == 224 and cfg.train.backbone == "resnet50"
    groups = {s.name: s.group for s in cfg.data.extra_ood}
    assert groups == {"ssb_hard": "near", "ninco": "near", "inaturalist": "far",
                      "textures": "far", "openimage_o": "far"}


def test_weights_that_are_not_a_dit_pipeline_directory_are_refused(tmp_path):
    from oodscale.diffusion.dit import resolve_weights

    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_weights(str(tmp_path / "missing"))
    (tmp_path / "half" / "transformer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks \\['vae'\\]"):
        resolve_weights(str(tmp_path / "half"))
    with pytest.raises(ValueError, match="generate.pretrained"):
        resolve_weights(None)


@torch.no_grad()
def test_guided_sampling_of_one_hot_labels_matches_diffusers_ditpipeline(tmp_path):
    """The whole sampling path (noise, guidance against the null class, DDIM on the DiT's own
    schedule, VAE decode) against diffusers' own DiTPipeline on integer labels."""
    from diffusers import DiTPipeline

    from oodscale.config import GenerateConfig
    from oodscale.diffusion.sample import sample_images, scheduler_for

    tiny_dit(classes=1000).save(tmp_path)  # DiTPipeline's null class is 1000, hard-coded
    ours = DiTGenerator.from_directory(tmp_path)
    gen = GenerateConfig(generator="dit", pretrained=str(tmp_path), sampler="ddim", steps=4,
                         guidance=4.0)
    pipe = DiTPipeline(transformer=_plain_dit(tmp_path), vae=ours.vae,
                       scheduler=scheduler_for(ours, gen))
    expected = pipe(class_labels=[3, 8], guidance_scale=4.0, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    got = sample_images(ours, one_hot(torch.tensor([3, 8]), 1000), 4.0,
                        scheduler_for(ours, gen), torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.add(1).div(2).permute(0, 2, 3, 1),
                               torch.from_numpy(expected), atol=1e-5, rtol=0)


@torch.no_grad()
def test_one_hot_stays_exact_under_bf16_autocast(dit_dir):
    """GPU actors sample under bf16 autocast: the mix must not drop to bf16 with it."""
    plain, ours = _plain_dit(dit_dir), DiTGenerator.from_directory(dit_dir)
    x, t = _inputs(2)
    classes = torch.tensor([1, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(x, timestep=t, class_labels=classes).sample[:, :4]
        got = ours.predict_noise(x, t, ours.condition(one_hot(classes, DIT_CLASSES)))
        embedder = ours.transformer.transformer_blocks[0].norm1.emb.class_embedder
        mixed = embedder(ours.condition(torch.full((1, DIT_CLASSES), 1 / DIT_CLASSES)))
    assert torch.equal(got, expected)
    assert mixed.dtype == torch.float32  # the table's dtype, not autocast's


def test_a_ddpm_config_refuses_a_run_whose_card_is_a_pretrained_dits(tmp_path):
    from oodscale.diffusion.model import UNetGenerator
    from oodscale.runtime import layout_for

    cfg = load_config(CONFIG, [f"storage.root={tmp_path}"])
    layout = layout_for(cfg)
    card = {"generator": "dit", "source": "/models/dit", "model_hash": "0" * 16}
    layout.storage.write_bytes_atomic(f"{layout.diffusion_dir}/model.json",
                                      json.dumps(card).encode())
    with pytest.raises(ValueError, match="own experiment name"):
        UNetGenerator.model_card(cfg, layout)
