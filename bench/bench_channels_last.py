"""What channels-last (NHWC) weights buy on this machine's CPU, side by side in one run.

    .venv/bin/python bench/bench_channels_last.py            # ~2 min on 2 cores
    .venv/bin/python bench/bench_channels_last.py --threads 2

`build_classifier` returns channels-last classifiers. This times, for the backbones the CPU
configs use, one OE training step (`oe_step`, fp32 through Accelerate, batch 32 + 32 outliers)
and the evaluation forward (batch 256) with the weights NCHW and channels-last, the two
interleaved per round (median of the rounds), and the digits DDPM's training step (which stays
NCHW: the ratio says why). The GPU check times the same lever on a GPU (`NCHW` rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oodscale.classify.models import build_classifier  # noqa: E402
from oodscale.classify.step import oe_step  # noqa: E402
from oodscale.diffusion.model import LabelConditionedUNet  # noqa: E402
from oodscale.distributed import make_accelerator  # noqa: E402

CASES = [("smallcnn", 1, 16), ("smallcnn", 1, 28), ("smallcnn", 3, 32), ("resnet18", 3, 32),
         ("wrn40_2", 3, 32)]
BATCH, EVAL_BATCH, CLASSES, DIM = 32, 256, 10, 64


def rate(fn: Callable[[], object], units: int, min_s: float = 1.5) -> float:
    """Units per second of `fn` after two warm-up calls, timed for at least `min_s`."""
    fn()
    fn()
    start, iters = time.perf_counter(), 0
    while iters < 3 or time.perf_counter() - start < min_s:
        fn()
        iters += 1
    return units * iters / (time.perf_counter() - start)


def layout(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    return model.to(memory_format=torch.channels_last if channels_last
                    else torch.contiguous_format)


def oe_rate(backbone: str, channels: int, size: int, channels_last: bool) -> float:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    accelerator = make_accelerator("no", use_gpu=False)
    torch.manual_seed(0)
    model = layout(build_classifier(backbone, "arcface", channels, size, CLASSES, DIM),
                   channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    x = torch.rand(BATCH, channels, size, size) * 2 - 1
    outliers = torch.rand(BATCH, channels, size, size) * 2 - 1
    y = torch.arange(BATCH) % CLASSES
    return rate(lambda: oe_step(model, optimizer, accelerator, x, y, outliers, 0.5), BATCH)


def eval_rate(backbone: str, channels: int, size: int, channels_last: bool) -> float:
    torch.manual_seed(0)
    model = layout(build_classifier(backbone, "arcface", channels, size, CLASSES, DIM),
                   channels_last).eval()
    x = torch.rand(EVAL_BATCH, channels, size, size) * 2 - 1

    @torch.no_grad()
    def forward() -> None:
        model.embed_and_logits(x)

    return rate(forward, EVAL_BATCH)


def ddpm_rate(channels_last: bool, batch: int = 64) -> float:
    """The digits DDPM (16x16, widths 32-32) training step."""
    torch.manual_seed(0)
    model = layout(LabelConditionedUNet(6, 16, 1, (32, 32), 1), channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, 16, 16)
    y = torch.nn.functional.one_hot(torch.arange(batch) % 6, 6).float()

    def step() -> None:
        t = torch.randint(0, 1000, (batch,))
        loss = torch.nn.functional.mse_loss(model(x, t, y), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return rate(step, batch)


def side_by_side(what: str, fn: Callable[[bool], float], rounds: int) -> str:
    nchw, nhwc = [], []
    for _ in range(rounds):  # interleaved: load on the shared machine hits both alike
        nchw.append(fn(False))
        nhwc.append(fn(True))
    a, b = statistics.median(nchw), statistics.median(nhwc)
    return f"| {what} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, "
                        "as one Ray Train worker per core runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    rows = []
    for backbone, channels, size in CASES:
        name = f"{backbone}@{size}x{size}x{channels}"
        rows.append(side_by_side(f"OE train step, {name}, {BATCH} + {BATCH} outliers (ID images/s)",
                                 lambda cl, b=backbone, c=channels, s=size: oe_rate(b, c, s, cl),
                                 args.rounds))
        rows.append(side_by_side(f"eval forward, {name}, batch {EVAL_BATCH} (images/s)",
                                 lambda cl, b=backbone, c=channels, s=size: eval_rate(b, c, s, cl),
                                 args.rounds))
        print(rows[-2], rows[-1], sep="\n", flush=True)
    rows.append(side_by_side("DDPM train step, digits UNet 16x16, batch 64 (images/s)",
                             ddpm_rate, args.rounds))
    print("\n".join([
        f"## bench_channels_last: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
        f"Command: `.venv/bin/python bench/bench_channels_last.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}` (took "
        f"{time.time() - started:.0f} s; {platform.platform()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), median of {args.rounds} interleaved rounds)", "",
        "| case | NCHW | channels-last | ratio |", "|---|---:|---:|---:|", *rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
