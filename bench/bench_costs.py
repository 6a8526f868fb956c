"""Per-image costs of each stage's hot loop: FLOPs counted exactly, time measured on this machine.

    .venv/bin/python bench/bench_costs.py            # full run, 1 thread (~90 s)
    .venv/bin/python bench/bench_costs.py --quick    # smaller batches, one round (~50 s)
    .venv/bin/python bench/bench_costs.py --threads 0  # all cores (2 here)
    .venv/bin/python bench/bench_costs.py --no-write # print only, write no record

What it measures, with the model shapes read from configs/{digits,cifar10,imagenet}.yaml:

(a) DDPM training step (noise, forward, MSE, backward, AdamW) per image, for the digits,
    CIFAR-10 and ImageNet-64 UNets. The big UNets run at their real size on a tiny batch;
(b) DDPM sampling per image per denoising step, guidance w=1 (one forward) and w>1 (the
    classifier-free guidance forward on a doubled batch), and per image for 50 DDIM steps;
(c) classifier training step (ID + outlier rows in one forward, ArcFace + OE loss, AdamW) per
    image forwarded, for smallcnn@16, wrn40_2@32, resnet50@64, and the inference forward the
    evaluate stage runs;
(d) shard writing (PNG encode + deterministic tar, `tar_bytes`), PNG decoding (the training
    read path) and JPEG decode + resize (the ImageNet `prepare` path), images/s on one core.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` on the meta device (exact for the
counted ops: convolutions, matmuls, attention; no tensors are allocated, so the real ImageNet
sizes cost nothing to count). Elementwise ops (GroupNorm, SiLU, BatchNorm, the optimizer) are
not counted. A FLOP is one multiply or one add (a multiply-accumulate is 2).

Timing on a shared machine is noisy: every case runs in `--repeats` interleaved rounds (after
one untimed warm-up call), a 1024x1024 fp32 matmul is timed right before every case, and the
table reports the median time with its min-max range and the achieved FLOP rate as a fraction
of the matmul rate measured just before (a ratio that moves less than the raw times when
another job takes the cores). With 2 threads on 2 shared cores, a descheduled OpenMP thread
stalls every parallel region, which hurts the small models (many small ops) far more than the
matmul; so the default is `--threads 1` (per-core costs, much less sensitive to that);
`--threads 0` uses all cores. Nothing here is a GPU number.

The stage totals (on unless `--no-totals`) multiply the counted FLOPs by the image counts each
stage of configs/cifar10.yaml and configs/imagenet.yaml processes and divide by an assumed
sustained bf16 rate on an A100 / H100: a FLOP floor that GPU measurements contradict by 2-20x
(docs/benchmarks.md "GPU, measured"); plan with docs/scaling.md section 5 instead.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import io
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from records import write_record  # bench/records.py, beside this script
from torch.utils.flop_counter import FlopCounterMode

from oodscale.classify.losses import build_head, kl_to_uniform
from oodscale.classify.models import build_backbone, build_classifier
from oodscale.classify.step import oe_step
from oodscale.config import ExperimentConfig, load_config
from oodscale.data import builtin
from oodscale.data.shards import decode_png, tar_bytes
from oodscale.data.sources import decode_image
from oodscale.diffusion.model import LabelConditionedUNet, UNetGenerator
from oodscale.diffusion.sample import make_sampler, sample_images
from oodscale.diffusion.train import make_scheduler
from oodscale.distributed import make_accelerator
from oodscale.outlier_sources import generator_sources

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("digits", "cifar10", "imagenet")
# Dataset sizes the configs do not carry (ImageNet-1k: ILSVRC-2012 train / val).
DATASET_SIZES = {"digits": (None, None), "cifar10": (50_000, 10_000),
                 "imagenet": (1_281_167, 50_000)}
# Classes when the config cannot say (an ImageFolder tree is only listed at prepare time).
DEFAULT_CLASSES = {"imagenet": 1000}
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s: A100 SXM and H100 SXM.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0}
SUSTAINED = (0.30, 0.40)
DDIM_STEPS = 50


# --------------------------------------------------------------------------------------------
# Models from the configs


@dataclass
class Experiment:
    name: str
    cfg: ExperimentConfig
    num_classes: int

    @property
    def size(self) -> int:
        return self.cfg.data.image_size

    @property
    def channels(self) -> int:
        return self.cfg.data.channels

    def unet(self) -> LabelConditionedUNet:
        d = self.cfg.diffusion
        return LabelConditionedUNet(
            num_classes=self.num_classes, sample_size=self.size, in_channels=self.channels,
            block_out_channels=tuple(d.block_out_channels), layers_per_block=d.layers_per_block,
            attention=d.attention)

    def unet_label(self) -> str:
        d = self.cfg.diffusion
        att = ", attn" if d.attention else ""
        return (f"{self.name} UNet {self.size}x{self.size}x{self.channels} "
                f"{list(d.block_out_channels)} x{d.layers_per_block}{att}")

    def clf_label(self) -> str:
        return f"{self.cfg.train.backbone}@{self.size} ({self.name})"


def load_experiments() -> dict[str, Experiment]:
    out = {}
    for name in CONFIGS:
        path = ROOT / "configs" / f"{name}.yaml"
        cfg = load_config(path)
        classes = cfg.num_classes or DEFAULT_CLASSES[name]
        out[name] = Experiment(name, cfg, classes)
    return out


# --------------------------------------------------------------------------------------------
# FLOP counting (meta device: shapes only)


def _count(fn: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def unet_flops(exp: Experiment) -> tuple[float, float, int]:
    """(train fwd+bwd FLOPs per image, forward FLOPs per image, parameters) of the UNet."""
    batch = 2
    with torch.device("meta"):
        model = exp.unet()
        x = torch.randn(batch, exp.channels, exp.size, exp.size)
        t = torch.randint(0, 1000, (batch,))
        y = torch.zeros(batch, exp.num_classes)

    def train() -> None:
        model(x, t, y).float().pow(2).mean().backward()

    def forward() -> None:
        with torch.no_grad():
            model(x, t, y)

    params = sum(p.numel() for p in model.parameters())
    return _count(train) / batch, _count(forward) / batch, params


def classifier_flops(exp: Experiment) -> tuple[float, float, int]:
    """(train fwd+bwd FLOPs per image, forward FLOPs per image, parameters) of the classifier.

    The backbone is counted on the meta device; the head (ArcFace + OE, a few MFLOPs) on real
    CPU tensors, because the classifier's forward branches on label values.
    """
    t = exp.cfg.train
    batch = 2
    with torch.device("meta"):
        backbone = build_backbone(t.backbone, exp.channels, exp.size, t.embedding_dim)
        x = torch.randn(batch, exp.channels, exp.size, exp.size)

    def bb_train() -> None:
        backbone(x).sum().backward()

    def bb_forward() -> None:
        with torch.no_grad():
            backbone(x)

    head = build_head("arcface", t.embedding_dim, exp.num_classes)
    emb = torch.randn(2 * batch, t.embedding_dim, requires_grad=True)
    labels = torch.arange(batch) % exp.num_classes

    def head_train() -> None:
        logits = head.logits(emb)
        (head.id_loss(emb[:batch], labels) + kl_to_uniform(logits[batch:])).backward()

    def head_forward() -> None:  # no no_grad here: FlopCounterMode's module tracker trips on
        head.logits(emb)  # pml's `W.t()` under no_grad; the forward FLOPs are the same

    params = sum(p.numel() for p in backbone.parameters())
    params += sum(p.numel() for p in head.parameters())
    train = _count(bb_train) / batch + _count(head_train) / (2 * batch)
    forward = _count(bb_forward) / batch + _count(head_forward) / (2 * batch)
    return train, forward, params


# --------------------------------------------------------------------------------------------
# Timed cases


@dataclass
class Case:
    section: str
    name: str
    per: str  # what one unit is ("image", "image-step", ...)
    units: int  # units processed by one call of `run`
    run: Callable[[], None]
    flops_per_unit: float | None = None
    times: list[float] = field(default_factory=list)  # seconds per unit, one per round
    rel: list[float] = field(default_factory=list)  # achieved FLOP/s / matmul FLOP/s
    extra: str = ""
    key: str = ""  # for the CPU-hour estimates


def time_call(fn: Callable[[], None], min_time: float) -> float:
    """Seconds per call: repeat until `min_time` has passed (at least one call)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls


def matmul_case() -> Callable[[], None]:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return lambda: torch.mm(a, b)


MATMUL_FLOPS = 2 * 1024**3


def ddpm_train_case(exp: Experiment, batch: int, flops: float) -> Case:
    torch.manual_seed(0)
    model = exp.unet().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = make_scheduler(1000)
    x = torch.rand(batch, exp.channels, exp.size, exp.size) * 2 - 1
    y = torch.nn.functional.one_hot(torch.arange(batch) % exp.num_classes,
                                    exp.num_classes).float()

    def step() -> None:
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (batch,))
        pred = model(sched.add_noise(x, noise, t), t, y)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Case("a", f"{exp.unet_label()}, batch {batch}", "image", batch, step, flops)


def sample_case(exp: Experiment, batch: int, steps: int, guidance: float, fwd_flops: float,
                model: LabelConditionedUNet) -> Case:
    y = torch.nn.functional.one_hot(torch.arange(batch) % exp.num_classes,
                                    exp.num_classes).float()
    mult = 1 if guidance == 1.0 else 2

    def run() -> None:
        sampler = make_sampler("ddim", 1000, steps)
        sample_images(UNetGenerator(model, 1000), y, guidance, sampler,
                      torch.Generator().manual_seed(0))

    name = (f"{exp.name} DDIM, w={guidance:g} ({'2 forwards' if mult == 2 else '1 forward'}), "
            f"batch {batch}, {steps} steps")
    return Case("b", name, "image-step", batch * steps, run, mult * fwd_flops)


def clf_train_case(exp: Experiment, id_batch: int, out_batch: int, flops: float) -> Case:
    """The training stage's own OE step (`oe_step`), fp32 through a CPU Accelerator."""
    t = exp.cfg.train
    torch.manual_seed(0)
    accelerator = make_accelerator("no", use_gpu=False)
    model = build_classifier(t.backbone, "arcface", exp.channels, exp.size, exp.num_classes,
                             t.embedding_dim).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    x = torch.rand(id_batch, exp.channels, exp.size, exp.size) * 2 - 1
    y = torch.arange(id_batch) % exp.num_classes
    outliers = torch.rand(out_batch, exp.channels, exp.size, exp.size) * 2 - 1

    def step() -> None:
        oe_step(model, opt, accelerator, x, y, outliers, 0.5)

    name = f"{exp.clf_label()} train, {id_batch} ID + {out_batch} outliers"
    return Case("c", name, "image", id_batch + out_batch, step, flops)


def clf_eval_case(exp: Experiment, batch: int, flops: float) -> Case:
    t = exp.cfg.train
    model = build_classifier(t.backbone, "arcface", exp.channels, exp.size, exp.num_classes,
                             t.embedding_dim).eval()
    x = torch.rand(batch, exp.channels, exp.size, exp.size) * 2 - 1

    def run() -> None:
        with torch.no_grad():
            model.embed_and_logits(x)

    return Case("c", f"{exp.clf_label()} evaluate forward, batch {batch}", "image", batch, run,
                flops)


def _images(size: int, channels: int, n: int) -> np.ndarray:
    if channels == 1:  # the digits themselves
        from sklearn.datasets import load_digits

        raw = (load_digits().images * (255.0 / 16.0)).round().astype(np.uint8)
        return np.stack([builtin.resize(raw[i % len(raw)], size, 1) for i in range(n)])
    rng = np.random.default_rng(0)
    return builtin.crops(builtin.PHOTOS, n, size, channels, rng)


def shard_cases(n: int) -> list[Case]:
    cases = []
    for size, channels in ((16, 1), (32, 3), (64, 3)):
        images = _images(size, channels, n)
        samples = [(f"s{i:06d}", images[i], {"label": i % 10}) for i in range(n)]
        data, _ = tar_bytes(samples)
        cases.append(Case("d", f"shard write (PNG + tar) {size}x{size}x{channels}", "image", n,
                          lambda samples=samples: tar_bytes(samples),
                          extra=f"{len(data) / n / 1024:.2f} KiB/image in the tar",
                          key=f"write{size}"))
        pngs = [io.BytesIO() for _ in range(n)]
        for buf, image in zip(pngs, images, strict=True):
            Image.fromarray(image.squeeze()).save(buf, format="PNG")
        blobs = [b.getvalue() for b in pngs]
        cases.append(Case("d", f"PNG decode {size}x{size}x{channels} (training read path)",
                          "image", n, lambda blobs=blobs: [decode_png(b) for b in blobs],
                          key=f"decode{size}"))
    # The ImageNet prepare path: a JPEG about the size of an average ImageNet photo.
    photo = Image.fromarray(builtin._source_image("astronaut")).resize((500, 375))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    count = max(8, n // 4)
    cases.append(Case("d", "JPEG 500x375 decode + resize to 64x64x3 (ImageNet prepare)",
                      "image", count,
                      lambda: [decode_image(jpeg, 64, 3, "bench") for _ in range(count)],
                      extra=f"{len(jpeg) / 1024:.0f} KiB JPEG", key="jpeg64"))
    return cases


# --------------------------------------------------------------------------------------------
# Reporting


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_flops(flops: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def machine_info() -> list[str]:
    cpu, flags, model = platform.processor() or "unknown", set(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and cpu in ("unknown", platform.processor()):
                cpu = value.strip()
            elif key == "model" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    hyper = " (virtualised)" if "hypervisor" in flags else ""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [f"- machine: `{platform.platform()}`, {cpu} (model {model or '?'}, "
            f"{' '.join(simd) or 'no AVX2'}){hyper}, {os.cpu_count()} logical CPUs",
            f"- python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}, no GPU used",
            f"- load average at start (1/5/15 min): {load}"]


def flops_table(rows: list[tuple[str, float, float, int]]) -> list[str]:
    out = ["| model | params | train fwd+bwd / image | forward / image |",
           "|---|---:|---:|---:|"]
    for name, train, fwd, params in rows:
        out.append(f"| {name} | {params / 1e6:.2f} M | {fmt_flops(train)} | {fmt_flops(fwd)} |")
    return out


SECTIONS = {"a": "(a) DDPM training step", "b": "(b) DDPM sampling",
            "c": "(c) classifier training step and evaluate forward",
            "d": "(d) shards, one core"}


def timing_table(cases: list[Case]) -> list[str]:
    out = ["| stage | case | time per unit (median, min-max) | units/s | FLOPs per unit "
           "| achieved GFLOP/s | vs matmul |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for case in cases:
        med = statistics.median(case.times)
        spread = f"{fmt_time(min(case.times))}-{fmt_time(max(case.times))}"
        rate = f"{1 / med:,.1f}" if 1 / med < 100 else f"{1 / med:,.0f}"
        flops = achieved = rel = "-"
        if case.flops_per_unit:
            flops = fmt_flops(case.flops_per_unit)
            achieved = f"{case.flops_per_unit / med / 1e9:.1f}"
            rel = f"{statistics.median(case.rel):.0%}"
        name = case.name + (f" ({case.extra})" if case.extra else "")
        out.append(f"| {SECTIONS[case.section]} | {name} | {fmt_time(med)} per {case.per} "
                   f"({spread}) | {rate} | {flops} | {achieved} | {rel} |")
    return out


@dataclass
class StageTotal:
    experiment: str
    stage: str
    work: str
    flops: float


def stage_totals(exps: dict[str, Experiment],
                 counted: dict[str, dict[str, tuple[float, float, int]]]) -> list[StageTotal]:
    """FLOPs each GPU stage of cifar10 / imagenet spends, from the configs and counted FLOPs."""
    out = []
    for name in ("cifar10", "imagenet"):
        cfg = exps[name].cfg
        n_train, n_test = DATASET_SIZES[name]
        u_train, u_fwd, _ = counted["unet"][name]
        c_train, c_fwd, _ = counted["clf"][name]
        d, g, t, e = cfg.diffusion, cfg.generate, cfg.train, cfg.evaluate
        # Each epoch runs floor(N / (batch x workers)) steps of `batch` images per worker.
        per_epoch = (n_train // (d.batch_size * d.num_workers)) * d.batch_size * d.num_workers
        images = d.epochs * per_epoch
        out.append(StageTotal(name, "train-diffusion",
                              f"{d.epochs} epochs x {per_epoch:,} = {images / 1e6:.1f} M images",
                              images * u_train))
        samples = g.num_shards * g.samples_per_shard
        # One generation run per guidance scale the grid's label-mixup variants ask for.
        scales = sorted({s.guidance for s in generator_sources(t.outlier_sources, g.guidance)}
                        | {g.guidance})
        forwards = sum(samples * g.steps * (1 if w == 1.0 else 2) for w in scales)
        runs_desc = " + ".join(f"w={w:g}" + (" (2 forwards)" if w != 1.0 else "") for w in scales)
        out.append(StageTotal(name, "generate",
                              f"{samples / 1e6:.2f} M samples x {g.steps} steps, {runs_desc} = "
                              f"{forwards / 1e9:.2f} G UNet forwards",
                              forwards * u_fwd))
        per_epoch = (n_train // (t.batch_size * t.num_workers)) * t.batch_size * t.num_workers
        runs = collections.Counter(o for _, o in t.cells)
        runs = {o: count * len(t.seeds) for o, count in runs.items()}
        clf_images = 0
        for outliers, count in runs.items():
            clf_images += count * t.epochs * per_epoch * outlier_factor(t, outliers)
        desc = " + ".join(f"{c} runs {o}" for o, c in runs.items())
        out.append(StageTotal(name, "train",
                              f"{desc}, {t.epochs} epochs x {per_epoch:,} ID images, outlier runs "
                              f"forward {t.batch_size}+{t.outlier_batch_size} rows per "
                              f"{t.batch_size} ID = {clf_images / 1e9:.2f} G images fwd+bwd",
                              clf_images * c_train))
        n_runs = sum(runs.values())
        ood = sum(cfg.data.ood_set_size(n, "ood") or 1000 for n in cfg.data.ood_sets)
        scored = n_runs * (n_test + ood)
        fit = 0
        if {"knn", "mahalanobis"} & set(e.scores):
            fit = n_runs * n_train  # one fit task per classifier embeds the train set
        out.append(StageTotal(name, "evaluate",
                              f"{n_runs} runs x ({n_test:,} ID test + {ood:,} OOD) scored"
                              + (f" + {n_runs} x {n_train:,} train images embedded once for "
                                 "kNN/Mahalanobis" if fit else ""),
                              (scored + fit) * c_fwd))
    return out


def cpu_totals(exps: dict[str, Experiment], totals: list[StageTotal],
               cases: list[Case]) -> list[str]:
    """Core-hours of the image codec work around each stage, from the measured section (d)."""
    sec = {c.key: statistics.median(c.times) for c in cases if c.key}
    needed = {"write32", "decode32", "write64", "decode64", "jpeg64"}
    if not needed <= set(sec):
        return []
    out = ["| experiment | stage | codec work | core-hours on one core of this machine |",
           "|---|---|---|---:|"]
    for name in ("cifar10", "imagenet"):
        cfg = exps[name].cfg
        size = cfg.data.image_size
        n_train, n_test = DATASET_SIZES[name]
        ids = n_train + n_test
        if name == "imagenet":
            prep = ids * (sec["jpeg64"] + sec["write64"])
            what = f"{ids:,} JPEG decode + resize + PNG/tar write"
        else:
            prep = ids * sec[f"write{size}"]
            what = f"{ids:,} PNG/tar writes (the binary batches need no decoding)"
        out.append(f"| {name} | prepare | {what} | {prep / 3600:.2g} |")
        images = {t.stage: t.work for t in totals if t.experiment == name}
        g = cfg.generate
        scales = ({s.guidance for s in generator_sources(cfg.train.outlier_sources, g.guidance)}
                  | {g.guidance})
        samples = g.num_shards * g.samples_per_shard * len(scales)
        out.append(f"| {name} | generate | {samples:,} PNG/tar writes | "
                   f"{samples * sec[f'write{size}'] / 3600:.2g} |")
        for stage, count in counted_images(cfg, n_train).items():
            out.append(f"| {name} | {stage} | {count / 1e6:,.1f} M PNG decodes "
                       f"({images[stage].split(' = ')[0]}) | "
                       f"{count * sec[f'decode{size}'] / 3600:.2g} |")
    return out


def counted_images(cfg: ExperimentConfig, n_train: int) -> dict[str, float]:
    """Images each training stage reads (and decodes) over its whole run."""
    d, t = cfg.diffusion, cfg.train
    per_epoch = (n_train // (d.batch_size * d.num_workers)) * d.batch_size * d.num_workers
    out = {"train-diffusion": float(d.epochs * per_epoch)}
    per_epoch = (n_train // (t.batch_size * t.num_workers)) * t.batch_size * t.num_workers
    total = 0.0
    for _, outliers in t.cells:
        total += len(t.seeds) * t.epochs * per_epoch * outlier_factor(t, outliers)
    out["train"] = total
    return out


def outlier_factor(t, outliers: str) -> float:
    """Rows forwarded per ID row: every source but `none` adds an outlier batch to each step."""
    return 1.0 if outliers == "none" else 1 + t.outlier_batch_size / t.batch_size


def totals_table(totals: list[StageTotal]) -> list[str]:
    lo, hi = SUSTAINED
    head = ["| experiment | stage | work (from the config) | FLOPs "]
    for gpu, peak in PEAK_TFLOPS.items():
        head.append(f"| {gpu} GPU-h at {lo:.0%}-{hi:.0%} of {peak:g} TFLOP/s ")
    out = ["".join(head) + "|", "|---|---|---|---:" + "|---:" * len(PEAK_TFLOPS) + "|"]
    for row in totals:
        cells = [f"| {row.experiment} | {row.stage} | {row.work} | {row.flops:.2e} "]
        for peak in PEAK_TFLOPS.values():
            fast = row.flops / (peak * 1e12 * hi) / 3600
            slow = row.flops / (peak * 1e12 * lo) / 3600
            cells.append(f"| {fast:,.3g}-{slow:,.3g} ")
        out.append("".join(cells) + "|")
    return out


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller batches, one round, shorter timing windows")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds per case (default 3, quick 1)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds each case runs per round (default 0.5, quick 0.2)")
    parser.add_argument("--only", default="abcd", help="sections to time, e.g. 'ad'")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 0 = torch's default (all cores). The "
                             "default 1 gives per-core costs, what a Ray actor with num_cpus "
                             "< 2 gets (OMP_NUM_THREADS=1), and stalls far less than 2 threads "
                             "when another job shares the cores")
    parser.add_argument("--no-totals", action="store_true", help="skip the stage-total table")
    parser.add_argument("--no-write", action="store_true",
                        help="print only; no record under bench/results/")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 0.5)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/bench_costs.py",
                                                 *(argv if argv is not None else sys.argv[1:])])
    if args.threads:
        torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    info = machine_info()
    torch.manual_seed(0)

    exps = load_experiments()
    counted: dict[str, dict[str, tuple[float, float, int]]] = {"unet": {}, "clf": {}}
    for name, exp in exps.items():
        counted["unet"][name] = unet_flops(exp)
        counted["clf"][name] = classifier_flops(exp)
    flop_rows = [(exps[n].unet_label(), *counted["unet"][n]) for n in CONFIGS]
    flop_rows += [(exps[n].clf_label() + " + ArcFace head", *counted["clf"][n]) for n in CONFIGS]

    q = args.quick
    cases: list[Case] = []
    if "a" in args.only:
        for name, batch in (("digits", 16 if q else exps["digits"].cfg.diffusion.batch_size),
                            ("cifar10", 2 if q else 4), ("imagenet", 1)):
            cases.append(ddpm_train_case(exps[name], batch, counted["unet"][name][0]))
    if "b" in args.only:
        plan = (("digits", 16 if q else 64, 5), ("cifar10", 1 if q else 2, 2),
                ("imagenet", 1, 2))
        for name, batch, steps in plan:
            model = exps[name].unet().eval()
            for guidance in (1.0, exps[name].cfg.generate.guidance):
                cases.append(sample_case(exps[name], batch, steps, guidance,
                                         counted["unet"][name][1], model))
    if "c" in args.only:
        for name, half in (("digits", 16 if q else 32), ("cifar10", 4 if q else 8),
                           ("imagenet", 2)):
            exp = exps[name]
            cases.append(clf_train_case(exp, half, half, counted["clf"][name][0]))
            cases.append(clf_eval_case(exp, 4 * half, counted["clf"][name][1]))
    if "d" in args.only:
        cases += shard_cases(128 if q else 256)

    matmul = matmul_case()
    time_call(matmul, 0.2)  # warm-up
    matmul_rates = []
    for round_index in range(repeats):
        for case in cases:
            if round_index == 0:
                case.run()  # warm-up: allocator, oneDNN kernels for this shape, lazy imports
            # The matmul right before the case is the yardstick for what the cores gave us then.
            rate = MATMUL_FLOPS / time_call(matmul, 0.1)
            matmul_rates.append(rate)
            seconds = time_call(case.run, min_time) / case.units
            case.times.append(seconds)
            if case.flops_per_unit:
                case.rel.append(case.flops_per_unit / seconds / rate)
        print(f"round {round_index + 1}/{repeats} done "
              f"({(dt.datetime.now(dt.timezone.utc) - started).seconds} s)", file=sys.stderr)
    rate = statistics.median(matmul_rates)

    lines = [f"## bench_costs: {started:%Y-%m-%d %H:%M} UTC", "",
             f"Command: `{command}` ({repeats} interleaved round(s), >= {min_time:g} s per case "
             f"per round, took {(dt.datetime.now(dt.timezone.utc) - started).seconds} s)", "",
             *info,
             f"- load average at end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
             f"- 1024x1024 fp32 matmul, timed for 0.1 s before every case: {rate / 1e9:.1f} "
             f"GFLOP/s median ({min(matmul_rates) / 1e9:.1f}-{max(matmul_rates) / 1e9:.1f}); "
             "'vs matmul' below is the case's achieved FLOP rate over that matmul rate", "",
             "FLOPs per image, counted with FlopCounterMode on the meta device "
             "(convolutions, matmuls, attention; 1 MAC = 2 FLOPs):", "",
             *flops_table(flop_rows), ""]
    if cases:
        lines += ["Measured on this CPU (fp32; the big models at their real size, tiny batch):",
                  "", *timing_table(cases), ""]
        steps = [c for c in cases if c.section == "b"]
        if steps:
            lines += ["Per image for 50 DDIM steps = 50 x the per image-step time above "
                      "(the step time includes the scheduler update, which is a few elementwise "
                      "ops next to the UNet):", ""]
            for c in steps:
                lines.append(f"- {c.name.split(',')[0]}, {c.name.split(',')[1].strip()}: "
                             f"{fmt_time(DDIM_STEPS * statistics.median(c.times))} per image")
            lines.append("")
    if not args.no_totals:
        totals = stage_totals(exps, counted)
        lines += ["Stage totals from the counted FLOPs at an assumed 30-40 % of peak: a floor. "
                  "Measured GPU throughput is 2-20x lower (docs/benchmarks.md, GPU, measured); "
                  "plan with docs/scaling.md section 5. Evaluate: kNN/Mahalanobis embed the ID "
                  "train set once per classifier (counted), in fp32:", "",
                  *totals_table(totals), ""]
        cpu = cpu_totals(exps, totals, cases)
        if cpu:
            lines += ["CPU codec work around the stages, from the measured (d) rates (one core "
                      "of this machine; prepare adds reading the source files, not measured):",
                      "", *cpu, ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        print(f"recorded in {write_record('bench_costs', command, text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
