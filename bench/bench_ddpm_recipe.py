"""The DDPM recipe at equal compute: sample quality of the old recipe (constant lr, no warm-up,
no EMA) against the EMA recipe at three peak learning rates, and the new schedule without the
EMA, on one config.

    .venv/bin/python bench/bench_ddpm_recipe.py [--config configs/fashion.yaml] [--arm old ...]
        [--seed 0 --seed 1 ...]

Each arm trains the config's DDPM (same UNet, epochs, batch size, data: equal optimiser steps)
in its own experiment `<root>/<config>-recipe-<arm>` and measures it as every run does
(`diffusion.quality_per_class`, diffusion/quality.py: the reference classifier's accuracy on
class-conditional samples, the Fréchet distance in its embedding, how "between" label-mixup
samples are). One record under bench/results/ holds the arms side by side. The reference
classifier and the sampling settings are the same for every arm (same seeds), so the arms
differ by the recipe alone. With several `--seed`s (the experiment's `seed`: the DDPM's init,
batches and noise, and the reference classifier, shared by the arms of one seed) each arm is
compared with `old` seed by seed: the mean paired difference and its 95 % t-interval over seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import write_record  # noqa: E402

ARMS: dict[str, list[str]] = {
    "old": ["diffusion.lr=2e-3", "diffusion.lr_schedule=constant",
            "diffusion.lr_warmup_steps=0", "diffusion.ema_decay=0"],
    "ema-2e-4": ["diffusion.lr=2e-4"],
    "ema-1e-3": ["diffusion.lr=1e-3"],
    "ema-2e-3": ["diffusion.lr=2e-3"],  # the old recipe's lr under the new schedule and EMA
    "noema-1e-3": ["diffusion.lr=1e-3", "diffusion.ema_decay=0"],  # the EMA's share alone
}
FIGURES = [("conditional_accuracy", "cond. acc. (%)", ".1f"),
           ("reference_test_accuracy", "ref. on ID test (%)", ".1f"),
           ("frechet_distance", "Fréchet", ".2f"),
           ("mix_pair_mass", "mixup mass a+b", ".2f"),
           ("mix_weaker_share", "weaker share", ".2f"),
           ("mix_entropy_ratio", "entropy / log K", ".2f")]


def run_arm(config: str, arm: str, seed: int, root: str, per_class: int,
            extra: list[str]) -> dict:
    """Prepare and train one arm's DDPM at one seed (a finished arm is read back); its card and
    time. Seed 0 keeps the name of the records before seeds were an option."""
    name = f"{Path(config).stem}-recipe-{arm}" + (f"-s{seed}" if seed else "")
    common = [f"name={name}", f"storage.root={root}", f"seed={seed}",
              f"diffusion.quality_per_class={per_class}", *extra, *ARMS[arm]]
    oodscale = [str(Path(sys.executable).parent / "oodscale")]
    started = time.time()
    for stage in ("prepare", "train-diffusion"):
        subprocess.run([*oodscale, stage, config, *common], check=True)
    card = json.loads((Path(root) / name / "diffusion" / "model.json").read_text())
    return {"card": card, "seconds": time.time() - started}


def table(results: dict[tuple[str, int], dict]) -> str:
    head = ["arm", "seed", "overrides", "steps", "final loss"] + [label for _, label, _ in FIGURES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (arm, seed), res in results.items():
        card, quality = res["card"], res["card"].get("quality", {})
        cells = [arm, str(seed), " ".join(ARMS[arm]) or "(config)", f"{card['steps']:,}",
                 f"{card['final_loss']:.4f}"]
        cells += [format(quality[key], fmt) if key in quality else "-"
                  for key, _, fmt in FIGURES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(results: dict[tuple[str, int], dict]) -> str:
    """Each arm minus `old` at the same seed: mean and 95 % t-interval over the seeds both
    ran (a difference whose interval holds zero is undecided)."""
    from scipy import stats

    seeds = sorted({seed for arm, seed in results if arm == "old"})
    head = ["arm − old", "seeds"] + [label for _, label, _ in FIGURES[:3]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in dict.fromkeys(a for a, _ in results):
        both = [s for s in seeds if arm != "old" and (arm, s) in results]
        if len(both) < 2:
            continue
        cells = [arm, str(len(both))]
        for key, _, fmt in FIGURES[:3]:
            diff = np.array([results[arm, s]["card"]["quality"][key]
                             - results["old", s]["card"]["quality"][key] for s in both])
            half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
            mean = diff.mean()
            cells.append(f"{mean:+{fmt[:-1]}f} [{mean - half:+{fmt[:-1]}f}, "
                         f"{mean + half:+{fmt[:-1]}f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/fashion.yaml")
    parser.add_argument("--arm", action="append", choices=list(ARMS),
                        help="arms to run (default: all)")
    parser.add_argument("--root", default="runs", help="storage root of the arms' experiments")
    parser.add_argument("--per-class", type=int, default=64,
                        help="quality samples per class (and as many label-mixup ones)")
    parser.add_argument("--seed", action="append", type=int,
                        help="experiment seeds to run every arm at (default: 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every arm, e.g. diffusion.torch_threads=1")
    parser.add_argument("--no-write", action="store_true", help="print only, write no record")
    args = parser.parse_args()
    results = {(arm, seed): run_arm(args.config, arm, seed, args.root, args.per_class,
                                    args.set)
               for seed in args.seed or [0] for arm in args.arm or list(ARMS)}
    some = next(iter(results.values()))["card"]
    quality = some.get("quality", {})
    body = (f"DDPM of `{args.config}` per arm, trained in `{args.root}/<config>-recipe-<arm>`; "
            f"{some['epochs']} epochs, {some['steps']:,} optimiser steps each"
            f"{', with ' + ' '.join(args.set) if args.set else ''}. Quality: "
            f"{quality.get('class_samples', '?')} class-conditional and "
            f"{quality.get('mix_samples', '?')} label-mixup samples ({quality.get('sampling')}), "
            f"read by {quality.get('reference', 'the reference classifier')} against "
            f"{quality.get('test_images', '?')} ID test images.\n\n{table(results)}\n\n"
            + (f"Paired by seed:\n\n{diffs}\n\n" if (diffs := paired(results)) else "")
            + "Wall time per arm (prepare + train + quality, s): "
            + ", ".join(f"{arm}/s{seed} {res['seconds']:.0f}"
                        for (arm, seed), res in results.items()) + "\n")
    print(body)
    if not args.no_write:
        command = "bench/bench_ddpm_recipe.py " + " ".join(sys.argv[1:])
        print(f"record: {write_record('bench_ddpm_recipe', command, body)}")


if __name__ == "__main__":
    main()
