"""`oodscale prepare|train-diffusion|generate|train|calibrate|evaluate|run|report|claims|verify|
status CONFIG [k=v ...]`, and `oodscale predict CONFIG --run RUN PATH...`.

The `jobs/*.py` entry points call `job_main` with their stage, so `ray job submit -- python
jobs/generate.py --config ...` and `oodscale generate ...` run the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from oodscale import tracking
from oodscale.config import ConfigError, ExperimentConfig, load_config
from oodscale.diffusion.generators import GENERATORS
from oodscale.errors import MissingError, named_error
from oodscale.outlier_sources import generator_sources, synthetic_dirname
from oodscale.runtime import RunLayout, init_ray, layout_for

Stage = Callable[[ExperimentConfig, RunLayout], str]


def _prepare(cfg: ExperimentConfig, layout: RunLayout) -> str:
    from oodscale.data.prepare import prepare

    written = prepare(cfg, layout)
    return "wrote " + ", ".join(written) if written else "all shard sets already prepared"


def _train_diffusion(cfg: ExperimentConfig, layout: RunLayout) -> str:
    from oodscale.diffusion.train import train_diffusion

    if not GENERATORS[cfg.generate.generator].trained_here:
        return (f"nothing to train: generate.generator={cfg.generate.generator} uses the "
                f"pretrained weights {cfg.generate.pretrained}")
    card = train_diffusion(cfg, layout)
    return (f"DDPM at {layout.storage.uri_of(layout.diffusion_dir)} (final loss "
            f"{card['final_loss']:.4f}, model {card['model_hash']})")


def _generate(cfg: ExperimentConfig, layout: RunLayout) -> str:
    from oodscale.diffusion.generate import generate

    manifests = generate(cfg, layout)
    tracking.log_metrics({"synthetic_samples": sum(m.num_samples for m in manifests),
                          "synthetic_shards": sum(len(m.shards) for m in manifests)})
    uri = layout.storage.uri_of(layout.synthetic_variant(synthetic_dirname(cfg.generate.guidance)))
    return (f"{sum(m.num_samples for m in manifests)} synthetic outliers in "
            f"{sum(len(m.shards) for m in manifests)} shards ({len(manifests)} guidance "
            f"setting(s)) under {uri.rsplit('-w', 1)[0]}-w*; sample grid {uri}/grid.png")


def _train(cfg: ExperimentConfig, layout: RunLayout) -> str:
    from oodscale.classify.train import train_classifiers

    done = train_classifiers(cfg, layout)
    lines = [f"  {d['run']}: train acc {d['train_acc']:.1f}%, loss {d['loss']:.3f}" for d in done]
    return "\n".join(["trained:", *lines]) if lines else "every classifier already trained"


def _evaluate(cfg: ExperimentConfig, layout: RunLayout) -> str:
    from oodscale.evaluate.score import evaluate

    out = evaluate(cfg, layout)
    tracking.log_results(layout)
    return (f"\n{out['summary']}\n\nreport: {out['eval_dir']}/report.html (and report.md)\n"
            f"plots:  {out['eval_dir']}/plots/\n"
            f"data:   {out['eval_dir']}/results.parquet, {out['eval_dir']}/scores.parquet")


def _report(cfg: ExperimentConfig, layout: RunLayout) -> str:
    import pandas as pd

    from oodscale.evaluate.score import render_report

    frames = {name: pd.read_parquet(io.BytesIO(layout.storage.read_bytes(
        f"{layout.eval_dir}/{name}.parquet"))) for name in ("results", "scores")}
    return "\n" + render_report(cfg, layout, frames["results"], frames["scores"])


def _claims(cfg: ExperimentConfig, layout: RunLayout) -> str:
    """The paper's claims as evaluate decided them (claims.parquet), without Ray or models."""
    import pandas as pd

    from oodscale.evaluate.claims import claims_summary
    from oodscale.evaluate.report import markdown_table

    path = f"{layout.eval_dir}/claims.parquet"
    if not layout.storage.exists(path):
        raise MissingError(f"{layout.storage.uri_of(path)} not found: run `oodscale "
                                "evaluate` (or `oodscale report`) first")
    summary = claims_summary(pd.read_parquet(io.BytesIO(layout.storage.read_bytes(path))))
    if summary.empty:
        return "no claim to decide: the grid has no cell without outliers to compare against"
    return "\n" + markdown_table(summary)


def _verify(cfg: ExperimentConfig, layout: RunLayout) -> str:
    from oodscale.data.shards import verify_shards

    dirs = [layout.id_split("train"), layout.id_split("test"),
            *([layout.id_split("val")] if layout.storage.exists(layout.id_split("val")) else []),
            *(layout.ood_set(n) for n in cfg.data.ood_sets),
            *(layout.ood_val_set(n) for n in cfg.data.validation_ood_sets
              if layout.storage.exists(layout.ood_val_set(n)))]
    for source in generator_sources(cfg.train.outlier_sources, cfg.generate.guidance):
        if layout.storage.exists(layout.synthetic_variant(source.dirname)):
            dirs.append(layout.synthetic_variant(source.dirname))
    counts = [verify_shards(layout.storage, d).num_samples for d in dirs]
    return f"{len(dirs)} shard sets, {sum(counts)} samples: every checksum matches"


def _calibrate(cfg: ExperimentConfig, layout: RunLayout) -> str:
    from oodscale.evaluate.calibration import calibrate

    done = calibrate(cfg, layout)
    lines = [f"  {d['run']}: {cfg.detector.score} threshold {d['threshold']:.4g} "
             f"({d['images']} ID validation images)" for d in done]
    return ("\n".join([f"thresholds at {100 * cfg.detector.tpr:g}% ID accepted:", *lines])
            if lines else "every classifier already calibrated")


def _status(cfg: ExperimentConfig, layout: RunLayout) -> str:
    from oodscale.status import render_status

    return "\n" + render_status(cfg, layout)


def _predict(cfg: ExperimentConfig, layout: RunLayout, request: Any = None) -> str:
    from oodscale.predict import predict

    return "\n" + predict(cfg, layout, request)


PIPELINE: list[tuple[str, Stage]] = [
    ("prepare", _prepare), ("train-diffusion", _train_diffusion), ("generate", _generate),
    ("train", _train), ("calibrate", _calibrate), ("evaluate", _evaluate)]


def _run(cfg: ExperimentConfig, layout: RunLayout) -> str:
    needs_generator = bool(generator_sources(cfg.train.outlier_sources, cfg.generate.guidance))
    out = []
    for name, stage in PIPELINE:
        if name in ("train-diffusion", "generate") and not needs_generator:
            continue
        if name == "train-diffusion" and not GENERATORS[cfg.generate.generator].trained_here:
            continue  # a pretrained generator
        out.append(_timed(name, stage, cfg, layout))
    return f"{len(out)} stages (results above)"


STAGES: dict[str, Stage] = {**dict(PIPELINE), "run": _run, "report": _report, "verify": _verify,
                            "status": _status, "predict": _predict, "claims": _claims}
NEEDS_RAY = {"prepare", "train-diffusion", "generate", "train", "calibrate", "evaluate", "run"}


def _writer_lock(layout: RunLayout, command: str) -> contextlib.AbstractContextManager:
    """One writer per experiment root (oodscale.locking); read-only commands take no lock."""
    from oodscale.locking import experiment_lock

    writes = command in NEEDS_RAY or command == "report"
    return experiment_lock(layout, command) if writes else contextlib.nullcontext()


def _timed(name: str, stage: Stage, cfg: ExperimentConfig, layout: RunLayout) -> str:
    print(f"[oodscale] {name} ...", flush=True)
    started = time.time()
    # Only the stages that compute something are runs in MLflow; status, predict, verify read.
    tracked = tracking.stage_run(cfg, name) if name in NEEDS_RAY else contextlib.nullcontext()
    with tracked:
        message = stage(cfg, layout)
    print(f"[oodscale] {name} done in {time.time() - started:.0f}s: {message}", flush=True)
    return message


def _parser(stage: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oodscale" if stage is None else f"jobs/{stage.replace('-', '_')}.py",
        description="Deep metric learning with synthetic outlier exposure, on Ray.")
    if stage is None:
        parser.add_argument("command", choices=sorted(STAGES))
    parser.add_argument("--config", help="experiment YAML (default configs/digits.yaml)")
    parser.add_argument("--address", help="Ray cluster address (else RAY_ADDRESS, else local)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own logging and every worker's output here too")
    parser.add_argument("--ood", action="append", default=[],
                        metavar="NAME=PATH[,webdataset][,near]",
                        help="add your own OOD test set (ImageFolder tree by default); repeatable")
    if stage is None:
        parser.add_argument("--run", help="predict: the classifier (e.g. softmax-none-s0)")
        parser.add_argument("--score", help="predict: the score (default detector.score)")
        parser.add_argument("--out", default="predictions.csv",
                            help="predict: output rows, .csv or .parquet (default %(default)s)")
        parser.add_argument("--engine", choices=["auto", "local", "ray"], default="auto",
                            help="predict: local (one process), ray (Ray Data batch inference "
                                 "into Parquet parts, resumable) or auto (ray for more than "
                                 "20,000 files)")
        parser.add_argument("--skip-bad", action="store_true",
                            help="predict: an unreadable image is a row with its error, not the "
                                 "end of the run")
    parser.add_argument("rest", nargs="*", metavar="CONFIG_OR_KEY=VALUE",
                        help="the config path (if --config is not given), then dotted "
                             "overrides such as train.epochs=3")
    return parser


def _split_rest(config: str | None, rest: list[str]) -> tuple[str, list[str]]:
    if config is None and rest and "=" not in rest[0]:
        return rest[0], rest[1:]
    return config or "configs/digits.yaml", rest


def _split_paths(rest: list[str]) -> tuple[list[str], list[str]]:
    """predict's positionals: dotted `section.key=value` overrides, everything else a path."""
    overrides = [r for r in rest if re.match(r"^[A-Za-z_]\w*(\.\w+)+=", r)]
    return overrides, [r for r in rest if r not in overrides]


def main(argv: list[str] | None = None, stage: str | None = None) -> int:
    args = _parser(stage).parse_intermixed_args(argv)
    command = stage or args.command
    config_path, overrides = _split_rest(args.config, args.rest)
    run = STAGES[command]
    if command == "predict":
        from oodscale.predict import PredictRequest

        overrides, paths = _split_paths(overrides)
        run = functools.partial(run, request=PredictRequest(args.run, args.score, args.out,
                                                            paths, args.skip_bad,
                                                            args.engine, args.address))
    try:
        cfg = load_config(config_path, overrides, args.ood)
    except ConfigError as err:
        print(f"oodscale: {err}", file=sys.stderr)
        return 2
    layout = layout_for(cfg)
    try:
        with _writer_lock(layout, command):
            if command in NEEDS_RAY:
                init_ray(cfg, args.address, verbose=args.verbose)
            _timed(command, run, cfg, layout)
    except Exception as err:  # noqa: BLE001 - a named error anywhere in Ray's wrapping of it
        named = named_error(err)
        if named is None:
            raise
        print(f"oodscale {command}: error: {named}", file=sys.stderr)
        return 1
    return 0


def job_main(stage: str) -> Any:
    """Entry point of `jobs/<stage>.py`: exits with the stage's status."""
    sys.exit(main(sys.argv[1:], stage=stage))
