"""`oodscale predict` side by side: the single-process path and Ray Data batch inference.

    .venv/bin/python bench/bench_predict.py             # ~12 min on 2 cores; writes a record
                                                        # bench/results/bench_predict_*.md
    .venv/bin/python bench/bench_predict.py --no-write  # print only
    .venv/bin/python bench/bench_predict.py --no-write --images 500  # a quick look
    .venv/bin/python bench/bench_predict.py --images 50000 --paths ray1,ray2
                                        # Ray's memory at 50k and 500k (~40 min on 2 cores)

Both paths score the same folder of 32x32 RGB PNGs with the same classifier (a calibrated
smallcnn written by hand, tests/experiment.hand_calibrated: scoring cost is a digits model's).
Each row runs in a fresh process; its peak RSS and peak PSS are sums over that process and every
process under it (the local Ray it starts included), RSS sampled every 50 ms and PSS (shared
pages shared out, so the sum is the memory taken) every 250 ms, with the peak PSS of each tenth
of the run. Images/s is the predict call alone; Ray's start-up (a local Ray, once per process)
is its own column. Every path runs at N and at 10x N images: flat memory means neither the
driver nor the actors hold more for more images, so the tenths of the 10x N run after its
start-up stay level.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_ray_overhead import PeakRSS  # noqa: E402

MARK = "bench_predict result: "


def make_images(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(folder / f"{i:07d}.png")


def one(engine: str, actors: int, root: Path, folder: Path, out: Path) -> dict[str, float]:
    """One predict in this process: {seconds, startup} (startup: init_ray, 0 for local)."""
    from oodscale.config import load_config
    from oodscale.predict import PredictRequest, predict
    from oodscale.runtime import init_ray, layout_for

    cfg = load_config(ROOT / "configs" / "digits.yaml",
                      [f"storage.root={root}", f"evaluate.concurrency={actors}",
                       "evaluate.batch_size=512"])
    startup = 0.0
    if engine == "ray":
        started = time.perf_counter()
        init_ray(cfg)
        startup = time.perf_counter() - started
    started = time.perf_counter()
    predict(cfg, layout_for(cfg), PredictRequest("x-none-s0", None, str(out), [str(folder)],
                                                 engine=engine))
    return {"seconds": time.perf_counter() - started, "startup": startup}


def run_case(engine: str, actors: int, count: int, work: Path) -> dict[str, float]:
    """`one` in a fresh process, with the peak RSS of its process tree."""
    folder = work / f"images-{count}"
    if not folder.exists():
        make_images(folder, count)
    out = work / f"out-{engine}-{actors}-{count}" / "rows.parquet"
    command = [sys.executable, __file__, "--one", engine, str(actors), str(work / "runs"),
               str(folder), str(out)]
    with PeakRSS(proportional=True) as peak:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    marked = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    result = json.loads(marked[-1][len(MARK):])  # Ray may print after it
    return {**result, "images": count, "images_per_s": count / result["seconds"],
            "peak_mib": peak.peak / 2**20, "peak_pss_mib": peak.peak_pss / 2**20,
            "at_peak": peak.at_peak, "tenths": tenths(peak.series)}


def tenths(series: list[tuple[float, int]]) -> list[float]:
    """The peak summed PSS (MiB) in each tenth of a run's wall time: at a steady rate, the
    tenth of its images. Flat memory: the last tenths no higher than the second."""
    end = series[-1][0] if series else 0.0
    peaks = [0.0] * 10
    for seconds, pss in series:
        k = min(int(10 * seconds / end), 9) if end else 0
        peaks[k] = max(peaks[k], pss / 2**20)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--paths", default="local,ray1,ray2",
                        help="which of local, ray1, ray2 (Ray with 1 or 2 actors) to run")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--one", nargs=5, metavar=("ENGINE", "ACTORS", "ROOT", "FOLDER", "OUT"))
    args = parser.parse_args()
    if args.one:
        engine, actors, root, folder, out = args.one
        print(MARK + json.dumps(one(engine, int(actors), Path(root), Path(folder), Path(out))),
              flush=True)
        return
    from tests.experiment import hand_calibrated

    n = args.images
    paths = {"local": ("local", 1), "ray1": ("ray", 1), "ray2": ("ray", 2)}
    cases = [(*paths[name], count) for count in (n, 10 * n) for name in args.paths.split(",")]
    rows, load = [], [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hand_calibrated(work / "runs")
        for engine, actors, count in cases:
            row = {"engine": engine, "actors": actors, **run_case(engine, actors, count, work)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    load.append(os.getloadavg()[0])
    lines = [f"{platform.processor() or platform.machine()}, "
             f"`python bench/bench_predict.py --images {n}`; 32x32 RGB PNGs, a digits "
             f"smallcnn, evaluate.batch_size=512. Peak RSS and peak PSS: summed over the "
             f"process and every process under it (its local Ray included); RSS counts a "
             f"shared page (Ray's object store) once per process that mapped it, PSS shares it "
             f"out, so summed PSS is the memory the run takes. Load average (1 min) at start "
             f"and end: {load[0]:.1f}, {load[1]:.1f} on {os.cpu_count()} cores.", "",
             "| path | actors | images | images/s | Ray start-up (s) | peak RSS (MiB) | "
             "peak PSS (MiB) | processes at peak PSS |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['actors'] if r['engine'] == 'ray' else '-'} | "
              f"{r['images']:,} | {r['images_per_s']:,.0f} | "
              f"{r['startup']:.1f} | {r['peak_mib']:,.0f} | {r['peak_pss_mib']:,.0f} | "
              f"{sum(c for c, _ in r['at_peak'].values())} |" for r in rows]
    lines += ["", "Peak PSS (MiB) in each tenth of the run's wall time (process start to exit, "
              "the Ray start-up and the actors' loading in the first):", "",
              "| path | actors | images | " + " | ".join(f"{k + 1}/10" for k in range(10)) + " |",
              "|---|---|---|" + "---|" * 10]
    lines += [f"| {r['engine']} | {r['actors']} | {r['images']:,} | "
              + " | ".join(f"{v:,.0f}" for v in r["tenths"]) + " |" for r in rows]
    lines += ["", "PSS at the peak by process name (count × name: MiB), largest first:", ""]
    lines += [f"- {r['engine']} {r['actors']} actor(s), {r['images']:,} images: " + ", ".join(
        f"{c} × {name}: {mib:,.0f}" for name, (c, mib) in
        sorted(r["at_peak"].items(), key=lambda kv: -kv[1][1])) for r in rows
        if r["engine"] == "ray"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        from records import write_record  # bench/records.py, beside this script

        print(f"recorded in {write_record('bench_predict', shlex.join(sys.argv), text)}")


if __name__ == "__main__":
    main()
