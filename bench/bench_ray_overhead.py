"""What Ray costs at equal work, side by side in one run, on this machine.

    .venv/bin/python bench/bench_ray_overhead.py             # ~15 min on 2 cores; a record
                                                             # under bench/results/
    .venv/bin/python bench/bench_ray_overhead.py --no-write  # print only
    .venv/bin/python bench/bench_ray_overhead.py --no-write --cases training  # (b) alone, ~2 min
    .venv/bin/python bench/bench_ray_overhead.py --no-write --cases startup   # (d) alone, ~1 min

(a) generation: the digits config's generate stage (Ray Data, one sampling actor) against a
    plain loop in this process calling the same `ShardSampler` on the same shards and drawing
    the same grid; Ray's ~5 s of actor start-up is fixed, so the ratio is for this work;
(b) training: one grid cell through Ray Train + Accelerate (one worker) against a plain torch
    loop of the same `train_epoch` on the same rows; the steady-state step rate of each (the
    worker's own `images_per_s`) and the start-up cost Ray Train adds once per worker group;
(c) memory: peak RSS of the whole local Ray (driver, raylet, workers: every process under this
    one) while generating 1k and 10k synthetic images, and while training one epoch over 1x and
    10x the ID shards with streaming (`train.cache_mb=0`) and with the default in-memory cache;
(d) start-up: a one-worker group whose loop only reports, through `run_trainer`, at Ray Train's
    default controller poll interval (2 s) and at the one oodscale sets (0.5 s).

Every Ray worker and the plain loops use one torch thread, so the rows compare the same compute.
The models are the digits config's (a 16x16 UNet, smallcnn); the work is sized so one row takes
seconds to tens of seconds, long enough that Ray's fixed costs show at their real share.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from records import write_record  # noqa: E402  (bench/records.py, beside this script)

from oodscale.classify.step import train_epoch  # noqa: E402
from oodscale.classify.train import RunSpec, _card, train_group  # noqa: E402
from oodscale.config import ExperimentConfig, load_config  # noqa: E402
from oodscale.data.shards import (  # noqa: E402
    Manifest,
    ShardInfo,
    load_arrays,
    shard_name,
    try_read_manifest,
    write_manifest,
    write_shard,
)
from oodscale.data.streams import read_rows, reshuffled_batches, training_set  # noqa: E402
from oodscale.diffusion.generate import draw_grid, generate_variant  # noqa: E402
from oodscale.diffusion.generators import MODEL_CARD, content_hash  # noqa: E402
from oodscale.diffusion.model import LabelConditionedUNet  # noqa: E402
from oodscale.diffusion.sample import ShardSampler  # noqa: E402
from oodscale.distributed import (  # noqa: E402
    HEALTH_CHECK_ENV,
    HEALTH_CHECK_INTERVAL_S,
    make_accelerator,
    prepare,
    run_trainer,
)
from oodscale.outlier_sources import synthetic_dirname  # noqa: E402
from oodscale.outliers import OutlierStream  # noqa: E402
from oodscale.progress import epoch_progress  # noqa: E402
from oodscale.runtime import layout_for  # noqa: E402

SYN = synthetic_dirname(3.0)  # the shards of labelmix at the digits config's guidance
BASE = ["generate.concurrency=1", "generate.cpus_per_actor=1", "generate.grid_per_class=1",
        "train.num_workers=1", "train.cpus_per_worker=1", "train.losses=[arcface]",
        "train.outliers=[labelmix]", "train.seeds=[0]"]


class PeakRSS:
    """Peak of the summed RSS of this process and all its descendants, sampled every 50 ms.

    With `proportional`, also the peak of their summed PSS (proportional set size: a page
    shared by n processes counts 1/n in each), read from smaps every 250 ms, and which
    processes made it up at that peak (`at_peak`: name -> (count, MiB)). RSS counts Ray's
    shared object-store pages once per process that mapped them, so a summed RSS grows with
    how many workers touched the store; the summed PSS is the machine's memory. `series` keeps
    every PSS sample, to tell a peak of start-up from one that grows with the work done."""

    def __init__(self, proportional: bool = False) -> None:
        self.peak, self.peak_pss, self._stop = 0, 0, threading.Event()
        self.at_peak: dict[str, tuple[int, float]] = {}
        self.series: list[tuple[float, int]] = []  # (seconds since start, summed PSS)
        self._proportional = proportional
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree() -> list[psutil.Process]:
        me = psutil.Process()
        return [me, *me.children(recursive=True)]

    def _total(self) -> int:
        total = 0
        for proc in self._tree():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _pss(self) -> tuple[int, dict[str, tuple[int, float]]]:
        total, parts = 0, {}
        for proc in self._tree():
            try:
                pss, name = proc.memory_full_info().pss, self._label(proc)
            except psutil.Error:
                continue
            total += pss
            count, mib = parts.get(name, (0, 0.0))
            parts[name] = (count + 1, mib + pss / 2**20)
        return total, parts

    @staticmethod
    def _label(proc: psutil.Process) -> str:
        """A Ray worker's title (ray::IDLE, ray::MapWorker(...)); for a Python process its
        script's name (the driver, Ray's monitors)."""
        name = proc.name()
        if not name.startswith("python"):
            return name
        script = next((a for a in proc.cmdline()[1:] if a.endswith(".py")), name)
        return Path(script).name

    def _run(self) -> None:
        tick, started = 0, time.perf_counter()
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            if self._proportional and tick % 5 == 0:
                total, parts = self._pss()
                self.series.append((time.perf_counter() - started, total))
                if total > self.peak_pss:
                    self.peak_pss, self.at_peak = total, parts
            tick += 1
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def make_run(root: Path, overrides: list[str]) -> tuple[ExperimentConfig, object]:
    cfg = load_config(ROOT / "configs" / "digits.yaml", [f"storage.root={root}", *BASE,
                                                         *overrides])
    return cfg, layout_for(cfg)


def write_id_shards(layout, copies: int, rng: np.random.Generator) -> Manifest:
    """`copies` x 4 shards of 256 random 16x16 digits-like images, labels 0-5."""
    directory = layout.id_split("train")
    shards = []
    for i in range(4 * copies):
        images = rng.integers(0, 256, (256, 16, 16, 1), dtype=np.uint8)
        samples = ((f"id{i:04d}_{k:04d}", images[k], {"label": int(k % 6)}) for k in range(256))
        shards.append(write_shard(layout.storage, directory, shard_name("train", i), samples))
    manifest = Manifest(kind="id", split="train", image_size=16, channels=1,
                        class_names=[str(c) for c in range(6)], shards=shards)
    write_manifest(layout.storage, directory, manifest)
    return manifest


def write_ddpm(layout, cfg: ExperimentConfig) -> dict:
    """A random-weight DDPM of the config's shape, saved as train-diffusion would (beside the
    ID training shards it would have read: generate maps its class names through them)."""
    if try_read_manifest(layout.storage, layout.id_split("train")) is None:
        write_id_shards(layout, 1, np.random.default_rng(0))
    torch.manual_seed(0)
    d = cfg.diffusion
    model = LabelConditionedUNet(6, 16, 1, tuple(d.block_out_channels), d.layers_per_block)
    unet_dir = Path(layout.diffusion_dir) / "unet"
    model.save_pretrained(unet_dir, safe_serialization=True)
    card = {"num_classes": 6, "class_names": [str(c) for c in range(6)], "image_size": 16,
            "channels": 1, "timesteps": d.timesteps, "model_hash": content_hash(unet_dir),
            "epochs": 0, "final_loss": None, "images_per_s": None}
    layout.storage.write_bytes_atomic(f"{layout.diffusion_dir}/{MODEL_CARD}",
                                      json.dumps(card).encode())
    return card


def plain_generation(cfg: ExperimentConfig, layout, card: dict, out_dir: str) -> None:
    """The generate stage's work without Ray: same sampler class, shards, manifest, grid."""
    gen = cfg.generate
    class_map = list(range(card["num_classes"]))
    sampler = ShardSampler(layout.storage.uri, layout.diffusion_dir, out_dir, gen.model_dump(),
                           card, class_map, 16, cfg.seed, use_gpu=False)
    manifest = Manifest(kind="synthetic", split="labelmix", image_size=16, channels=1,
                        class_names=card["class_names"])
    for index in range(gen.num_shards):
        row = sampler({"shard": np.array([index])})
        manifest.shards.append(ShardInfo(row["path"][0], row["count"][0], row["sha256"][0]))
        write_manifest(layout.storage, out_dir, manifest)
    draw_grid(layout.storage.uri, layout.diffusion_dir, out_dir, gen.model_dump(), card,
              card["class_names"], class_map, cfg.seed, use_gpu=False)


def bench_generation(tmp: Path, rounds: int) -> list[str]:
    plain, ray_times, same = [], [], True
    for r in range(rounds):  # interleaved, so load on the shared machine hits both alike
        cfg, layout = make_run(tmp / f"gen{r}", [])  # the digits config's generate stage
        card = write_ddpm(layout, cfg)
        plain.append(timed(partial(plain_generation, cfg, layout, card, str(tmp / f"plain{r}"))))
        ray_times.append(timed(partial(generate_variant, cfg, layout, SYN)))
        same &= bool((load_arrays(layout.storage, str(tmp / f"plain{r}"))[0]
                      == load_arrays(layout.storage, layout.synthetic_variant(SYN))[0]).all())
    p, r_ = statistics.median(plain), statistics.median(ray_times)
    g = cfg.generate
    return [f"| (a) generate, the digits config's stage at one actor: "
            f"{g.num_shards * g.samples_per_shard:,} samples ({g.num_shards} shards x "
            f"{g.samples_per_shard}, {g.sampler.upper()} {g.steps}, w = {g.guidance:g}) + grid, "
            f"median of {rounds} | {p:.1f} s | {r_:.1f} s | {r_ / p:.2f} | identical shards: "
            f"{same}; Ray "
            f"adds {r_ - p:.1f} s (actor start, model load; the grid is drawn by its own task, "
            f"in a second process beside the actor) |"]


def plain_training(cfg: ExperimentConfig, manifest: Manifest, syn_dir: str, layout,
                   steps: int) -> list[float]:
    """images/s of each of the cell's epochs in this process: the worker's `train_epoch` on the
    same model, rows (held as the worker holds them), outliers and learning-rate schedule."""
    from accelerate.state import AcceleratorState

    from oodscale.classify.checkpoints import classifier_from_card

    t = cfg.train
    AcceleratorState._reset_state(True)
    accelerator = make_accelerator(t.mixed_precision, use_gpu=False)
    card = _card(cfg, RunSpec("arcface", "labelmix", 0), manifest)
    torch.manual_seed(0)
    model = classifier_from_card(card)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=t.lr, total_steps=t.epochs * steps, pct_start=0.15)
    model, optimizer = prepare(accelerator, model, optimizer)
    id_rows, syn_rows = ({k: v for k, v in read_rows(layout.storage, d).items() if k != "order"}
                         for d in (layout.id_split("train"), syn_dir))  # as a worker keeps them
    outliers = OutlierStream("labelmix", t.outlier_batch_size, 6, 0, "cpu",
                             reshuffled_batches(syn_rows, t.outlier_batch_size, 1))
    id_batches = reshuffled_batches(id_rows, t.batch_size, 0)

    return [train_epoch(model, optimizer, accelerator, lr_schedule, id_batches, outliers, steps,
                        t.lambda_oe)["images_per_s"] for _ in range(t.epochs)]


def bench_training(tmp: Path, rounds: int) -> list[str]:
    plain_rates, ray_rates, walls, computes = [], [], [], []
    for r in range(rounds):  # interleaved, so load on the shared machine hits both alike
        # Both sides train the cell's 12 epochs of 128 steps and are compared on the median
        # epoch after the first (warm-up): one epoch alone swung ±5 % from epoch to epoch.
        cfg, layout = make_run(tmp / f"train{r}", [
            "train.epochs=12", "generate.num_shards=2", "generate.samples_per_shard=128",
            "generate.steps=2"])
        manifest = write_id_shards(layout, 4, np.random.default_rng(0))
        write_ddpm(layout, cfg)
        generate_variant(cfg, layout, SYN)
        torch.set_num_threads(1)
        steps = manifest.num_samples // cfg.train.batch_size
        plain = plain_training(cfg, manifest, layout.synthetic_variant(SYN), layout, steps)
        plain_rates.append(statistics.median(plain[1:]))
        t = cfg.train
        id_data, _ = training_set(layout.storage, layout.id_split("train"), t.num_workers,
                                  t.cache_mb)
        syn = training_set(layout.storage, layout.synthetic_variant(SYN), t.num_workers,
                           t.cache_mb)
        epochs: list[float] = []  # each epoch's rate as the worker publishes it
        with epoch_progress("bench train", cfg.train.epochs,
                            lambda item, epochs=epochs: epochs.append(item["images_per_s"])):
            walls.append(timed(partial(train_group, cfg, layout,
                                       [RunSpec("arcface", "labelmix", 0)], id_data, manifest,
                                       {SYN: syn}, "bench")))
        ray_rates.append(statistics.median(epochs[1:]))
        computes.append(sum(steps * cfg.train.batch_size / rate for rate in epochs))
    plain_rate, ray_rate = statistics.median(plain_rates), statistics.median(ray_rates)
    wall = statistics.median(walls)
    fixed = statistics.median(w - c for w, c in zip(walls, computes, strict=True))
    return [f"| (b) train step, smallcnn arcface + OE, {cfg.train.batch_size} + "
            f"{cfg.train.outlier_batch_size} rows, median epoch of epochs 2-{cfg.train.epochs}, "
            f"median of {rounds} rounds | {plain_rate:,.0f} ID images/s | {ray_rate:,.0f} ID "
            f"images/s | {plain_rate / ray_rate:.2f} | per round: plain "
            f"{', '.join(f'{x:,.0f}' for x in plain_rates)}; Ray "
            f"{', '.join(f'{x:,.0f}' for x in ray_rates)} |",
            f"| (b) Ray Train start-up + teardown per worker group (wall minus the epochs' "
            f"compute), median of {rounds} | | {fixed:.1f} s of {wall:.1f} s | | once per "
            "`oodscale train` phase, not per grid cell |"]


def bench_memory(tmp: Path) -> list[str]:
    rows = []
    peaks = {}
    for samples in (1_000, 10_000):
        cfg, layout = make_run(tmp / f"mem-gen-{samples}", [
            f"generate.num_shards={samples // 250}", "generate.samples_per_shard=250",
            "generate.steps=2", "generate.batch_size=250", "diffusion.block_out_channels=[8,8]"])
        card = write_ddpm(layout, cfg)
        del card
        with PeakRSS() as rss:
            generate_variant(cfg, layout, SYN)
        peaks[samples] = rss.peak
    rows.append(f"| (c) peak RSS, generate 1k vs 10k samples (every process of the local Ray) | "
                f"{peaks[1_000] / 2**20:,.0f} MiB | {peaks[10_000] / 2**20:,.0f} MiB | "
                f"{peaks[10_000] / peaks[1_000]:.2f} | |")
    for cache in ("0", "1024"):
        peaks = {}
        for copies in (1, 10):
            cfg, layout = make_run(tmp / f"mem-train-{cache}-{copies}", [
                "train.epochs=1", "train.outliers=[none]", f"train.cache_mb={cache}"])
            manifest = write_id_shards(layout, copies, np.random.default_rng(copies))
            id_data, _ = training_set(layout.storage, layout.id_split("train"),
                                      cfg.train.num_workers, cfg.train.cache_mb)
            with PeakRSS() as rss:
                train_group(cfg, layout, [RunSpec("arcface", "none", 0)], id_data, manifest, {},
                            f"mem-{cache}-{copies}")
            peaks[copies] = rss.peak
        label = "streaming (cache_mb=0)" if cache == "0" else "cached (default)"
        rows.append(f"| (c) peak RSS, train 1 epoch over 4 vs 40 ID shards (1k vs 10k images), "
                    f"{label} | {peaks[1] / 2**20:,.0f} MiB | {peaks[10] / 2**20:,.0f} MiB | "
                    f"{peaks[10] / peaks[1]:.2f} | |")
    return rows


def _report_once(_config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1.0})


def bench_startup(tmp: Path, rounds: int) -> list[str]:
    """Wall time of a worker group that does nothing, at two controller poll intervals."""
    cfg, layout = make_run(tmp / "startup", [])
    before = os.environ.get(HEALTH_CHECK_ENV)
    fits: dict[str, list[float]] = {"2.0": [], HEALTH_CHECK_INTERVAL_S: []}
    try:
        for r in range(rounds):  # interleaved
            for interval, walls in fits.items():
                os.environ[HEALTH_CHECK_ENV] = interval  # Ray Train hands it to its controller
                walls.append(timed(partial(run_trainer, _report_once, {}, {}, cfg.train, layout,
                                           f"startup-{r}-{interval}")))
    finally:
        os.environ.pop(HEALTH_CHECK_ENV)
        if before is not None:
            os.environ[HEALTH_CHECK_ENV] = before
    ray_default, ours = (statistics.median(fits[k]) for k in fits)
    return [f"| (d) one-worker group that only reports (start, one report, teardown), "
            f"controller polls every 2 s (Ray's default) / {HEALTH_CHECK_INTERVAL_S} s "
            f"(oodscale's), median of {rounds} | {ray_default:.1f} s | {ours:.1f} s | "
            f"{ray_default / ours:.2f} | per round: "
            f"{'; '.join(f'{a:.1f} / {b:.1f} s' for a, b in zip(*fits.values(), strict=True))} |"]


CASES: dict[str, Callable[[Path, int], list[str]]] = {
    "generation": bench_generation, "training": bench_training,
    "memory": lambda tmp, _rounds: bench_memory(tmp), "startup": bench_startup}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true",
                        help="print only; no record under bench/results/")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a), (b), (d)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES),
                        help="which of (a) generation, (b) training, (c) memory, (d) "
                             "startup to run")
    args = parser.parse_args(argv)
    import ray

    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    ray.init(num_cpus=4, object_store_memory=300 * 2**20, include_dashboard=False,
             log_to_driver=False)
    torch.set_num_threads(1)
    started = time.time()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for case in args.cases for row in CASES[case](Path(tmp), args.rounds)]
    ray.shutdown()
    cmd = "bench/bench_ray_overhead.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"## bench_ray_overhead: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
        f"Command: `.venv/bin/python {cmd.strip()}` (took {time.time() - started:.0f} s)", "",
        f"- machine: `{platform.platform()}`, {os.cpu_count()} logical CPUs; python "
        f"{platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}",
        f"- load average at start / end: {load[0]:.2f} / {os.getloadavg()[0]:.2f}", "",
        "| case | plain (no Ray) / 1x | Ray / 10x | ratio | note |",
        "|---|---:|---:|---:|---|", *rows, ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        print(f"recorded in {write_record('bench_ray_overhead', '.venv/bin/python ' + cmd, text)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
