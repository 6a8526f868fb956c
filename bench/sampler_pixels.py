"""Where samplers and precisions land, pixel by pixel, on a trained DDPM.

    .venv/bin/python bench/sampler_pixels.py runs/digits/diffusion/unet   # ~3 min on 2 cores

Draws the same label-mixup conditions from the same initial noise (guidance 3), through the
pipeline's own `sample_images`, with DDIM as
`generate.sampler: ddim` runs it (x0 clipped, the raw noise prediction kept), DDIM re-deriving
the noise from the clipped x0 (`use_clipped_model_output`), and DPM-Solver++ (the samplers
table's `dpmsolver`), and prints the mean |difference| (on [-1, 1]) of each draw to long-run
references of each rule; then bf16 against fp32 sampling (speed and pixels) and, for scale,
what other initial noise moves. One torch thread throughout. docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oodscale.diffusion.mixup import mixup_labels  # noqa: E402
from oodscale.diffusion.model import LabelConditionedUNet, UNetGenerator  # noqa: E402
from oodscale.diffusion.sample import sample_images, sampling_autocast  # noqa: E402
from oodscale.diffusion.samplers import make_sampler  # noqa: E402

GUIDANCE = 3.0


def draw(model: UNetGenerator, labels: torch.Tensor, noise_seed: int, kind: str, steps: int,
         clipped_noise: bool = False, bf16: bool = False) -> torch.Tensor:
    """`sample_images` as generate runs it, with DDIM's clipping rule selectable."""
    scheduler = make_sampler(kind, 1000, steps)
    if clipped_noise:
        scheduler.step = partial(scheduler.step, use_clipped_model_output=True)
    with sampling_autocast(torch.device("cpu"), "bf16" if bf16 else "no"):
        return sample_images(model, labels, GUIDANCE, scheduler,
                             torch.Generator().manual_seed(noise_seed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("unet", type=Path, help="a trained DDPM's unet/ directory")
    parser.add_argument("--count", type=int, default=96)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    unet = LabelConditionedUNet.from_pretrained(args.unet, use_safetensors=True).eval()
    model, classes = UNetGenerator(unet, 1000), unet.config.num_classes
    rng = np.random.default_rng(0)
    a = rng.integers(0, classes, args.count)
    b = (a + 1 + rng.integers(0, classes - 1, args.count)) % classes
    labels = torch.as_tensor(mixup_labels(a, b, np.full(args.count, 0.5), classes)).float()
    refs = {"DDIM 200": draw(model, labels, 1, "ddim", 200),
            "DDIM 200, clipped-x0 noise": draw(model, labels, 1, "ddim", 200, True)}
    runs = {"DDIM 40": draw(model, labels, 1, "ddim", 40),
            "DDIM 40, clipped-x0 noise": draw(model, labels, 1, "ddim", 40, True),
            "DPM-Solver++ 20": draw(model, labels, 1, "dpmsolver", 20),
            "DPM-Solver++ 40": draw(model, labels, 1, "dpmsolver", 40)}
    other = draw(model, labels, 2, "ddim", 200)
    print(f"mean |difference| of {args.count} guided label-mixup draws (w = {GUIDANCE:g}), "
          f"fp32, one thread\n")
    print("| draw | " + " | ".join(f"vs {r}" for r in refs) + " |")
    print("|---|" + "---:|" * len(refs))
    for name, images in runs.items():
        print(f"| {name} | " + " | ".join(f"{(images - r).abs().mean():.3f}" for r in
                                          refs.values()) + " |")
    print(f"| DDIM 200 from other initial noise | {(other - refs['DDIM 200']).abs().mean():.3f} "
          f"| |")
    timings, drawn = {}, {}
    for bf16 in (False, True, False, True):  # interleaved against machine noise
        started = time.perf_counter()
        drawn[bf16] = draw(model, labels, 1, "ddim", 40, bf16=bf16)
        timings.setdefault(bf16, []).append(time.perf_counter() - started)
    moved = (drawn[True] - drawn[False]).abs().flatten()
    print(f"\nDDIM 40: fp32 {min(timings[False]):.1f} s, bf16 {min(timings[True]):.1f} s "
          f"({min(timings[False]) / min(timings[True]):.2f}x); bf16 moves a pixel by "
          f"{moved.mean():.4f} on average (p99 {moved.quantile(0.99):.3f}); other initial noise "
          f"by {(other - refs['DDIM 200']).abs().mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
