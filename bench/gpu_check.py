"""The project's GPU check: every stage end to end on a GPU, then each worker's hot loop timed.

    make gpu-check                                  # = bench/gpu_check.sh (installs, then this)
    python bench/gpu_check.py --out gpu_check.md    # with the packages already importable

Part 1 runs `oodscale prepare, train-diffusion, generate, train, evaluate` on a tiny digits
config with every GPU flag on (bf16 for the DDPM and the classifiers, one GPU worker each) and
every outlier source (none, labelmix, labelmix-w1, labelmix-filtered, noise, pixelmix) under
ArcFace, plus the plain softmax classifier the filter needs, scored with every score. It fails
when a stage raises or when results.parquet lacks a run or a score.

Part 2 times, on one GPU, what each worker does per step with the project's own classes
(random weights, shapes from configs/cifar10.yaml and configs/imagenet.yaml): issue 8's four
targets (cifar10 UNet guided DDIM-50 sampling, the wrn40_2 and resnet50@224 OE steps, the wrn40_2
evaluation forward), each followed by its levers, then the other rows (imagenet UNet, DiT-XL/2 +
VAE, DDPM training, resnet50@64, every loss head, kNN/Mahalanobis). Sampling is timed over a few
denoising steps and reported per 50 steps (the step cost does not depend on the step index).
Each row says what bounds it (profiled kernel time as a share of wall time). The
`torch.compile` rows run in a child process, so a crash costs one row.

It prints one Markdown table headed by the card's name (and writes it to --out after every row),
and exits 1 when any case failed, 2 when there is no CUDA GPU. On one H100 the pipeline took
322 s and run 2's timings 179 s up to its first compile row's end (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oodscale.classify.loss_table import LOSS_NAMES  # noqa: E402
from oodscale.classify.models import build_classifier  # noqa: E402
from oodscale.classify.step import oe_step  # noqa: E402
from oodscale.config import GenerateConfig, load_config  # noqa: E402
from oodscale.diffusion.classmap import to_generator_labels  # noqa: E402
from oodscale.diffusion.mixup import mixup_labels  # noqa: E402
from oodscale.diffusion.model import LabelConditionedUNet, UNetGenerator  # noqa: E402
from oodscale.diffusion.sample import (  # noqa: E402
    make_sampler,
    sample_images,
    sampling_autocast,
    scheduler_for,
)
from oodscale.diffusion.train import make_scheduler  # noqa: E402
from oodscale.distributed import make_accelerator  # noqa: E402
from oodscale.evaluate.detectors import compute_scores, fit_features  # noqa: E402
from oodscale.evaluate.score_table import SCORE_NAMES  # noqa: E402

SOURCES = ["none", "labelmix", "labelmix-w1", "labelmix-filtered", "noise", "pixelmix"]
PIPELINE = [
    "data.ood_sets=[openset,textures,gaussian]", "data.ood_samples=64",
    "diffusion.block_out_channels=[32,32]", "diffusion.epochs=1", "diffusion.batch_size=64",
    "diffusion.num_workers=1", "diffusion.use_gpu=true", "diffusion.mixed_precision=bf16",
    "generate.num_shards=2", "generate.samples_per_shard=128", "generate.steps=10",
    "generate.concurrency=1", "generate.use_gpu=true", "generate.filter_tau=0.99",
    "train.losses=[arcface]", f"train.outliers=[{','.join(SOURCES)}]", "train.epochs=1",
    "train.num_workers=1", "train.use_gpu=true", "train.mixed_precision=bf16",
    "evaluate.use_gpu=true", f"evaluate.scores=[{','.join(SCORE_NAMES)}]",
]
DDIM_STEPS = 50


@dataclass
class Settings:
    """Where and how hard to time: the GPU at full batch, or `--smoke` (CPU, batch 2)."""

    device: torch.device
    smoke: bool = False
    child: bool = False

    def batch(self, n: int) -> int:
        return 2 if self.smoke else n

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


RUN = Settings(torch.device("cuda"))


@dataclass
class Row:
    case: str
    setting: str
    value: str = ""
    status: str = "ok"
    bound: str = ""


def synced_rate(fn: Callable[[], None], units: float, min_time: float = 1.0,
                warmup: int = 2, max_iters: int = 200) -> float:
    """Units per second of `fn` on the device, after warm-up, timed until `min_time` passed."""
    if RUN.smoke:
        warmup, max_iters = 1, 1
    for _ in range(warmup):
        fn()
    RUN.sync()
    start, iters = time.perf_counter(), 0
    while iters < max_iters:
        fn()
        iters += 1
        if iters >= 3 and time.perf_counter() - start >= min_time:
            break
    RUN.sync()
    return units * iters / (time.perf_counter() - start)


def kernel_share(fn: Callable[[], None], rate: float, units: float, iters: int = 3) -> str:
    """What bounds `fn`: the GPU's kernel time per call (torch.profiler) as a share of the
    unprofiled wall time per call (`units / rate`), and the two costliest kernels. Near 100 %
    the kernels bound it (a faster kernel or less work helps); far below, the host does (Python,
    launches, syncs: CUDA graphs or fewer, larger kernels help)."""
    if RUN.device.type != "cuda":
        return "n/a (CPU)"
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            RUN.sync()
    except Exception as exc:  # noqa: BLE001 - the rate stands without its profile
        return f"profile failed ({type(exc).__name__}: {str(exc)[:80]})"
    kernels = [e for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    kernel_us = sum(e.self_device_time_total for e in kernels) / iters
    wall_us = 1e6 * units / rate
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:2]
    names = "; ".join(f"{e.key[:48]} {e.self_device_time_total / iters / kernel_us:.0%}"
                      for e in top).replace("|", "/")
    return f"kernels {kernel_us / wall_us:.0%} of wall ({len(kernels)} kinds); top: {names}"


def fresh_accelerator(mixed_precision: str):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    return make_accelerator(mixed_precision, use_gpu=RUN.device.type == "cuda")


# --------------------------------------------------------------------------------------------
# Part 1: the pipeline, every stage on the GPU


def run_pipeline(rows: list[Row]) -> None:
    import pandas as pd

    from oodscale.cli import main

    config = str(ROOT / "configs" / "digits.yaml")
    with tempfile.TemporaryDirectory() as root:
        overrides = [f"storage.root={root}", *PIPELINE]
        for stage in ("prepare", "train-diffusion", "generate", "train", "evaluate"):
            started = time.perf_counter()
            try:
                code = main([stage, config, *overrides])
                status = "ok" if code == 0 else f"FAILED (exit {code})"
            except Exception as exc:  # noqa: BLE001 - a failed stage is a row, not a crash
                traceback.print_exc()
                status = f"FAILED ({type(exc).__name__}: {str(exc)[:120]})"
            rows.append(Row(f"pipeline: {stage}", "digits, every GPU flag, bf16",
                            f"{time.perf_counter() - started:.1f} s", status))
            if status != "ok":
                return
        results = pd.read_parquet(Path(root) / "digits" / "eval" / "results.parquet")
        runs = {f"arcface-{s}-s0" for s in SOURCES} | {"softmax-none-s0"}
        missing_runs = sorted(runs - set(results["run"]))
        missing_scores = sorted(set(SCORE_NAMES) - set(results["score_name"]))
        ok = not missing_runs and not missing_scores
        rows.append(Row("pipeline: results.parquet", f"{len(runs)} runs x {len(SCORE_NAMES)} "
                        "scores", f"{len(results)} rows", "ok" if ok else
                        f"FAILED (missing runs {missing_runs}, scores {missing_scores})"))


# --------------------------------------------------------------------------------------------
# Part 2: per-worker throughput


def unet_for(name: str) -> tuple[LabelConditionedUNet, int, int]:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    d = cfg.diffusion
    classes = cfg.num_classes or 1000
    model = LabelConditionedUNet(
        num_classes=classes, sample_size=cfg.data.image_size, in_channels=cfg.data.channels,
        block_out_channels=tuple(d.block_out_channels), layers_per_block=d.layers_per_block,
        attention=d.attention)
    return model, classes, cfg.generate.batch_size


class _Bf16Input(UNetGenerator):
    """The UNet with bf16 weights and no autocast: its input cast once per step instead of
    every weight cast on every call, and GroupNorm in bf16 (autocast keeps it in fp32)."""

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                      condition: torch.Tensor) -> torch.Tensor:
        return self.model(noisy.to(torch.bfloat16), timesteps, condition)


def sampling_case(name: str, guidance: float, timed_steps: int, sampler: str = "ddim",
                  total_steps: int = DDIM_STEPS, channels_last: bool = False,
                  batch_scale: int = 1, bf16_weights: bool = False,
                  compiled: str | None = None) -> Row:
    """Guided sampling as an actor runs it (bf16 autocast, fp32 weights). Levers the actors do
    not use yet: `channels_last` (UNet weights NHWC), `batch_scale` (× the config's batch),
    `bf16_weights` (bf16 UNet, no autocast), `compiled` (torch.compile of the UNet)."""
    model, classes, batch = unet_for(name)
    batch, timed_steps = RUN.batch(batch * batch_scale), 1 if RUN.smoke else timed_steps
    device = RUN.device
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if bf16_weights:
        model = model.to(torch.bfloat16)
    runner = (_Bf16Input if bf16_weights else UNetGenerator)(model, 1000)
    if compiled:
        runner.model = compiled_model(model, compiled)
    labels = torch.full((batch, classes), 0.0)
    labels[:, 0], labels[:, 1] = 0.5, 0.5
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        with sampling_autocast(device, "no" if bf16_weights else "bf16"):
            sample_images(runner, labels, guidance, make_sampler(sampler, 1000, timed_steps),
                          generator, device)

    per_step_images = synced_rate(run, batch * timed_steps, warmup=2 if compiled else 1,
                                  max_iters=3)
    lever = ((", channels-last UNet" if channels_last else "")
             + (" weights, no autocast" if bf16_weights else "") + layout_note(False, compiled))
    row = Row(f"sampling: {name} UNet", f"{sampler}, guidance {guidance:g}, batch {batch}, "
              f"bf16{lever}", f"{per_step_images / total_steps:,.1f} samples/s at "
              f"{total_steps} steps")
    announce(row)
    row.bound = kernel_share(run, per_step_images, batch * timed_steps, iters=1)
    return row


def dit_xl2(smoke: bool):
    """Random weights of DiT-XL/2 at 256x256 (latent 4x32x32, 28 blocks of width 1152, 1000
    classes + null) and the SD VAE's shape; a miniature of both under --smoke."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    from oodscale.diffusion.dit import DiTGenerator

    heads, dim, layers, latent = (2, 8, 1, 4) if smoke else (16, 72, 28, 32)
    vae_widths = (8, 8) if smoke else (128, 256, 512, 512)
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=dim, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=latent, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_widths,
        down_block_types=("DownEncoderBlock2D",) * len(vae_widths),
        up_block_types=("UpDecoderBlock2D",) * len(vae_widths),
        layers_per_block=1 if smoke else 2, norm_num_groups=8 if smoke else 32)
    return DiTGenerator(transformer, vae)


def dit_sampling_case(batch: int = 64, guidance: float = 4.0,
                      total_steps: int = DDIM_STEPS) -> Row:
    """What one generate actor does for ImageNet-scale label-mixup: guided DiT-XL/2 steps on
    soft labels (bf16 autocast) plus the VAE decode, as images/s at `total_steps` steps."""
    model = dit_xl2(RUN.smoke).to(RUN.device)
    batch, device = RUN.batch(batch), RUN.device
    pairs = np.arange(batch) % 200
    labels = to_generator_labels(mixup_labels(pairs, (pairs + 1) % 200, np.full(batch, 0.5), 200),
                                 list(range(0, 1000, 5)), 1000)
    gen = GenerateConfig(generator="dit", pretrained="random", guidance=guidance, steps=1)
    generator = torch.Generator().manual_seed(0)

    def one_step() -> None:
        with sampling_autocast(device, "bf16"):
            sample_images(_NoDecode(model), labels, guidance, scheduler_for(model, gen),
                          generator, device)

    latents = torch.randn(batch, *model.latent_shape, device=device)

    def decode() -> None:
        with sampling_autocast(device, "bf16"), torch.no_grad():
            model.decode(latents)

    step_rate = synced_rate(one_step, 1, warmup=1, max_iters=5)
    decode_s = 1.0 / synced_rate(decode, 1, warmup=1, max_iters=5)
    rate = batch / (total_steps / step_rate + decode_s)
    what = "miniature (smoke)" if RUN.smoke else "256x256, random weights"
    return Row("sampling: DiT-XL/2 + VAE decode", f"{what}, ddim, guidance {guidance:g}, batch "
               f"{batch}, bf16", f"{rate:,.1f} images/s at {total_steps} steps "
               f"({1000 / step_rate:.0f} ms/step, decode {1000 * decode_s:.0f} ms)",
               bound="guided step: " + kernel_share(one_step, step_rate, 1, iters=2))


class _NoDecode:
    """The generator with decoding left out, so a timed denoising step is only that."""

    def __init__(self, model) -> None:
        self.model = model

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def decode(self, sample: torch.Tensor) -> torch.Tensor:
        return sample


def ddpm_train_case(name: str, batch: int, channels_last: bool = False) -> Row:
    """A DDPM training step as the workers run it (NCHW, bf16); `channels_last` is the lever
    the H100 profile points at (cuDNN's NCHW-to-NHWC conversion was its top kernel)."""
    model, classes, _ = unet_for(name)
    batch, device, cfg = RUN.batch(batch), RUN.device, model.config
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    accelerator = fresh_accelerator("bf16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = make_scheduler(1000)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    y = torch.nn.functional.one_hot(torch.arange(batch, device=device) % classes,
                                    classes).float()

    def step() -> None:
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (batch,), device=device)
        with accelerator.autocast():
            loss = torch.nn.functional.mse_loss(
                model(scheduler.add_noise(x, noise, t), t, y).float(), noise)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()

    rate = synced_rate(step, batch)
    lever = ", channels-last UNet" if channels_last else ""
    return Row(f"DDPM train step: {name} UNet", f"bf16, batch {batch}{lever}",
               f"{rate:,.0f} images/s", bound=kernel_share(step, rate, batch))


def layout_note(nchw: bool, compiled: str | None = None) -> str:
    """The levers a row turns off (NCHW weights) or on (torch.compile), for its setting."""
    return (", NCHW" if nchw else "") + (f", torch.compile {compiled}" if compiled else "")


def compiled_model(model, mode: str):
    """torch.compile with inductor in `mode` on the GPU ("reduce-overhead" adds CUDA graphs);
    the eager backend under --smoke, which traces the same graph without a compiler toolchain."""
    if RUN.smoke:
        return torch.compile(model, backend="eager")
    return torch.compile(model, mode=mode)


def oe_case(backbone: str, size: int, channels: int, classes: int, dim: int, n_id: int,
            n_out: int, loss: str = "arcface", nchw: bool = False,
            compiled: str | None = None, compile_backbone_only: bool = False,
            fused_adamw: bool = False) -> Row:
    """One OE step as the workers run it (channels-last weights, bf16, foreach AdamW); `nchw`
    turns the channels-last lever off, `compiled` (a torch.compile mode) compiles the model or,
    with `compile_backbone_only`, the backbone alone (the loss head stays eager), `fused_adamw`
    makes the optimizer one kernel."""
    n_id, n_out, device = RUN.batch(n_id), RUN.batch(n_out), RUN.device
    accelerator = fresh_accelerator("bf16")
    model = build_classifier(backbone, loss, channels, size, classes, dim).train()
    if nchw:
        model = model.to(memory_format=torch.contiguous_format)
    if compiled and compile_backbone_only:
        model.backbone = compiled_model(model.backbone, compiled)
    elif compiled:
        model = compiled_model(model, compiled)
    optimizer = torch.optim.AdamW(model.to(device).parameters(), lr=1e-3,
                                  fused=True if fused_adamw else None)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = torch.rand(n_id, channels, size, size, device=device) * 2 - 1
    y = torch.arange(n_id, device=device) % classes
    outliers = torch.rand(n_out, channels, size, size, device=device) * 2 - 1

    def step() -> None:
        oe_step(model, optimizer, accelerator, x, y, outliers, 0.5)

    rate = synced_rate(step, n_id + n_out, warmup=3 if compiled else 2)
    levers = layout_note(nchw, compiled) + (" (backbone only)" if compile_backbone_only else "")
    levers += ", fused AdamW" if fused_adamw else ""
    row = Row(f"OE train step: {backbone}@{size}, {loss}",
              f"bf16, {n_id} ID + {n_out} outliers{levers}", f"{rate:,.0f} rows/s")
    announce(row)
    row.bound = kernel_share(step, rate, n_id + n_out)
    return row


def eval_case(precision: str, batch: int = 1024, nchw: bool = False,
              compiled: str | None = None) -> Row:
    """The scoring actors' forward; `compiled` (a torch.compile mode) fuses BatchNorm + ReLU."""
    batch, device = RUN.batch(batch), RUN.device
    model = build_classifier("wrn40_2", "arcface", 3, 32, 10, 128).to(device).eval()
    if nchw:
        model = model.to(memory_format=torch.contiguous_format)
    embed_and_logits = compiled_model(model.embed_and_logits, compiled) if compiled else \
        model.embed_and_logits
    x = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype,
                                             enabled=precision == "bf16"):
            embed_and_logits(x)

    rate = synced_rate(forward, batch, warmup=3 if compiled else 2)
    row = Row("evaluate forward: wrn40_2@32",
              f"{precision}, batch {batch}{layout_note(nchw, compiled)}", f"{rate:,.0f} images/s")
    announce(row)
    row.bound = kernel_share(forward, rate, batch)
    return row


def knn_mahalanobis_case(n_train: int = 50_000, n_test: int = 10_000, dim: int = 128) -> Row:
    n_train, n_test, device = RUN.batch(n_train // 100) * 100, RUN.batch(n_test), RUN.device
    gen = torch.Generator(device=device).manual_seed(0)
    train = torch.randn(n_train, dim, device=device, generator=gen)
    labels = torch.arange(n_train, device=device) % 10
    test = torch.randn(n_test, dim, device=device, generator=gen)
    logits = torch.randn(n_test, 10, device=device, generator=gen)

    def run() -> None:
        fitted = fit_features(train, labels)
        compute_scores(["knn", "mahalanobis"], logits, test, None, fitted)

    return Row("kNN + Mahalanobis: fit and score", f"{n_train:,} train x {n_test:,} test, "
               f"dim {dim}", f"{synced_rate(run, n_test, warmup=1, max_iters=5):,.0f} "
               "test images/s (fit included)")


def throughput_cases() -> list[tuple[str, Callable[[], Row]]]:
    """Issue 8's four targets first, each followed by its levers, then the other rows: a loan
    that runs out skips the least needed. The compile rows run in a child process (`isolated`)."""
    cifar = load_config(ROOT / "configs" / "cifar10.yaml").train
    imagenet = load_config(ROOT / "configs" / "imagenet.yaml").train
    wrn = ("wrn40_2", 32, 3, 10, cifar.embedding_dim, cifar.batch_size,
           cifar.outlier_batch_size)
    r50_224 = ("resnet50", 224, 3, 1000, imagenet.embedding_dim, 128, 128)
    cases: list[tuple[str, Callable[[], Row]]] = [
        ("sampling cifar10", lambda: sampling_case("cifar10", 3.0, 5)),
        ("sampling cifar10 channels-last", lambda: sampling_case("cifar10", 3.0, 5,
                                                                 channels_last=True)),
        ("sampling cifar10 batch x2", lambda: sampling_case("cifar10", 3.0, 5, batch_scale=2)),
        ("sampling cifar10 dpmsolver", lambda: sampling_case("cifar10", 3.0, 5, "dpmsolver", 20)),
        ("oe wrn40_2", lambda: oe_case(*wrn)),
        ("oe wrn40_2 NCHW", lambda: oe_case(*wrn, nchw=True)),
        ("oe wrn40_2 batch x4", lambda: oe_case(*wrn[:5], 4 * wrn[5], 4 * wrn[6])),
        ("oe resnet50@224", lambda: oe_case(*r50_224)),
        ("oe resnet50@224 NCHW", lambda: oe_case(*r50_224, nchw=True)),
        ("eval fp32", lambda: eval_case("fp32")),
        ("eval bf16", lambda: eval_case("bf16")),
        ("eval bf16 NCHW", lambda: eval_case("bf16", nchw=True)),
        ("eval fp32 batch 4096", lambda: eval_case("fp32", batch=4096)),
        ("eval bf16 batch 4096", lambda: eval_case("bf16", batch=4096)),
        ("oe wrn40_2 fused AdamW", lambda: oe_case(*wrn, fused_adamw=True)),
        ("sampling cifar10 bf16 weights", lambda: sampling_case("cifar10", 3.0, 5,
                                                                bf16_weights=True)),
        # torch.compile rows (isolated): each compiles for tens of seconds before it times,
        # so the likeliest to reach a target come first.
        ("oe wrn40_2 backbone CUDA graphs", lambda: oe_case(*wrn, compiled="reduce-overhead",
                                                            compile_backbone_only=True)),
        ("sampling cifar10 compiled", lambda: sampling_case("cifar10", 3.0, 5,
                                                            compiled="default")),
        ("eval bf16 batch 4096 compiled", lambda: eval_case("bf16", batch=4096,
                                                            compiled="default")),
        ("oe wrn40_2 backbone compiled", lambda: oe_case(*wrn, compiled="default",
                                                         compile_backbone_only=True)),
        ("oe wrn40_2 compiled", lambda: oe_case(*wrn, compiled="default")),
        ("oe wrn40_2 CUDA graphs", lambda: oe_case(*wrn, compiled="reduce-overhead")),
        ("sampling imagenet", lambda: sampling_case("imagenet", 3.0, 3)),
        ("sampling DiT-XL/2", dit_sampling_case),
        ("ddpm train cifar10", lambda: ddpm_train_case("cifar10", 128)),
        ("ddpm train cifar10 channels-last", lambda: ddpm_train_case("cifar10", 128,
                                                                     channels_last=True)),
        ("oe resnet50@64", lambda: oe_case("resnet50", 64, 3, 1000, imagenet.embedding_dim,
                                           imagenet.batch_size, imagenet.outlier_batch_size)),
    ]
    for loss in LOSS_NAMES:
        if loss != "arcface":
            cases.append((f"oe wrn40_2 {loss}", lambda loss=loss: oe_case(*wrn, loss)))
    cases.append(("knn/mahalanobis", knn_mahalanobis_case))
    return cases


def isolated(name: str) -> bool:
    """The torch.compile rows (named "compiled" or "CUDA graphs") run in a child process: a
    crash in compiled code or in CUPTI under CUDA graphs (the CUDA-graphs row died with SIGSEGV
    on an H100, torch 2.11) must cost one row, not the table."""
    return name.endswith(("compiled", "CUDA graphs"))


ROW_MARK = "GPU_CHECK_ROW "
ISOLATED_TIMEOUT_S = 240.0  # the CUDA-graphs row compiled and ran for ~120 s before it died


def announce(row: Row) -> None:
    """In a child process, hand the row to the parent as soon as its rate is known, so a crash
    while profiling afterwards still leaves the rate."""
    if RUN.child:
        print(ROW_MARK + json.dumps(asdict(row)), flush=True)


def run_isolated(name: str, timeout_s: float) -> Row:
    """Run one case in a child process (`--case`); its last announced row, or a FAILED row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name]
    if RUN.smoke:
        cmd.append("--smoke")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        out, code = done.stdout, done.returncode
        sys.stderr.write(done.stderr[-4000:])
    except subprocess.TimeoutExpired as exc:
        out, code = (exc.stdout or b"").decode(), f"timeout after {timeout_s:.0f} s"
    marked = [line[len(ROW_MARK):] for line in out.splitlines() if line.startswith(ROW_MARK)]
    if not marked:
        return Row(name, "", "", f"FAILED (child process: exit {code})")
    row = Row(**json.loads(marked[-1]))
    if code != 0:
        row.bound = f"child process died while profiling (exit {code}); the rate stands"
    return row


# --------------------------------------------------------------------------------------------


def header(started: float) -> list[str]:
    if RUN.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        card = (f"**{props.name}** ({props.total_memory / 2**30:.0f} GiB), "
                f"{torch.cuda.device_count()} visible")
    else:
        card = "none: `--smoke` on the CPU, batch 2 (checks the script, times nothing)"
    return [
        f"## GPU check: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- card: {card}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, python "
        f"{platform.python_version()}, {platform.platform()}",
        f"- command: `{' '.join(sys.argv)}`; took {time.perf_counter() - started:.0f} s",
        "",
    ]


def table(rows: list[Row]) -> list[str]:
    lines = ["| case | setting | result | status | what bounds it |", "|---|---|---:|---|---|"]
    lines += [f"| {r.case} | {r.setting} | {r.value} | {r.status} | {r.bound} |" for r in rows]
    return lines


def write_report(rows: list[Row], started: float, out: Path | None) -> str:
    """The table so far, to `out` too: written after every row, so a check cut off by its
    time limit still leaves what it measured."""
    report = "\n".join([*header(started), *table(rows), ""])
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return report


def run_child(name: str, cases: dict[str, Callable[[], Row]]) -> int:
    """`--case NAME`: one timing case, its row announced to the parent process."""
    RUN.child = True
    if name not in cases:
        print(f"gpu_check: unknown case {name!r}; cases: {', '.join(cases)}", file=sys.stderr)
        return 2
    announce(cases[name]())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--skip-pipeline", action="store_true", help="timings only")
    parser.add_argument("--budget-s", type=float, default=250.0,
                        help="seconds for the timings after the pipeline; the cases left when "
                             "they are spent are listed as skipped (default 250)")
    parser.add_argument("--smoke", action="store_true",
                        help="run every timing case once on the CPU at batch 2 (no pipeline): "
                             "checks the script itself where there is no GPU")
    parser.add_argument("--only", help="comma-separated timing cases to run, in the table's "
                        "order (e.g. after a short loan ran out); default: all")
    parser.add_argument("--case", help="run this one timing case (how compile rows run)")
    args = parser.parse_args(argv)
    cases = throughput_cases()
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {name for name, _ in cases})
        if unknown:
            print(f"gpu_check: unknown case(s) {unknown} in --only; cases: "
                  f"{', '.join(name for name, _ in cases)}", file=sys.stderr)
            return 2
        cases = [(name, case) for name, case in cases if name in wanted]
    if args.smoke:
        RUN.device, RUN.smoke, args.skip_pipeline = torch.device("cpu"), True, True
    elif not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU; this check needs one (nvidia-smi, CUDA torch)",
              file=sys.stderr)
        return 2
    if args.case:
        return run_child(args.case, dict(cases))
    started = time.perf_counter()
    rows: list[Row] = []
    if not args.skip_pipeline:
        run_pipeline(rows)
        write_report(rows, started, args.out)
    timings_from = time.perf_counter()
    for name, case in cases:
        if time.perf_counter() - timings_from > args.budget_s:
            rows.append(Row(name, "", "", f"skipped (past the {args.budget_s:.0f} s budget)"))
            continue
        try:
            # --smoke runs the compile rows here: a child per row would only repeat the imports
            isolate = isolated(name) and not RUN.smoke
            rows.append(run_isolated(name, ISOLATED_TIMEOUT_S) if isolate else case())
        except Exception as exc:  # noqa: BLE001 - one failed case must not hide the others
            traceback.print_exc()
            rows.append(Row(name, "", "", f"FAILED ({type(exc).__name__}: {str(exc)[:120]})"))
        if RUN.device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[gpu_check] {rows[-1].case}: {rows[-1].value} {rows[-1].status} "
              f"{rows[-1].bound}", flush=True)
        write_report(rows, started, args.out)
    print(write_report(rows, started, args.out))
    failed = [r for r in rows if r.status.startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
