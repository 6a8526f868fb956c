"""`oodscale status CONFIG`: what each stage has finished, what is partial, what a rerun does.

Read from the files each stage itself decides by (manifests, model cards, classifier cards,
Ray Train checkpoints, calibrations, results.parquet) without starting Ray, so it is safe to
run beside a job in progress and costs a few reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow.fs as pafs

from oodscale.config import ExperimentConfig
from oodscale.data.shards import try_read_manifest
from oodscale.data.validation import VAL_SPLIT, check_val_fraction
from oodscale.runtime import RunLayout

FINISHED, PARTIAL, MISSING, SKIPPED = "finished", "partial", "missing", "not needed"


@dataclass
class StageStatus:
    stage: str
    state: str  # FINISHED | PARTIAL | MISSING | SKIPPED
    detail: str
    rerun: str  # what `oodscale <stage>` would do now


def _state(done: int, total: int) -> str:
    return FINISHED if done == total else (MISSING if done == 0 else PARTIAL)


def latest_checkpoint_state(layout: RunLayout, group: str) -> dict | None:
    """state.json of a Ray Train run's newest complete checkpoint (what a rerun resumes from)."""
    storage, directory = layout.storage, f"{layout.ray_train_dir}/{group}"
    if not storage.exists(directory):
        return None
    infos = storage.fs.get_file_info(pafs.FileSelector(directory))
    names = sorted((i.path for i in infos if i.path.rsplit("/", 1)[-1].startswith("checkpoint_")
                    and i.type == pafs.FileType.Directory), reverse=True)
    for path in names:
        if storage.exists(f"{path}/state.json"):
            return json.loads(storage.read_bytes(f"{path}/state.json"))
    return None


def _prepare(cfg: ExperimentConfig, layout: RunLayout) -> StageStatus:
    storage = layout.storage
    splits = ["train", *([VAL_SPLIT] if cfg.data.val_fraction else []), "test"]
    sets = {f"id/{s}": layout.id_split(s) for s in splits}
    sets.update({f"ood/{n}": layout.ood_set(n)
                 for n in [*cfg.data.ood_sets, *(s.name for s in cfg.data.extra_ood)]})
    sets.update({f"ood-val/{n}": layout.ood_val_set(n) for n in cfg.data.validation_ood_sets})
    manifests = {name: try_read_manifest(storage, d) for name, d in sets.items()}
    have = [f"{n} {m.num_samples}" for n, m in manifests.items() if m is not None]
    todo = [n for n, m in manifests.items() if m is None]
    rerun = f"writes {', '.join(todo)}" if todo else "nothing"
    try:
        check_val_fraction(cfg, layout)
    except ValueError as err:
        rerun = f"refuses: {err}"
    return StageStatus("prepare", _state(len(have), len(sets)),
                       f"{len(have)} of {len(sets)} shard sets" + (f": {', '.join(have)}"
                                                                   if have else ""), rerun)


def _train_diffusion(cfg: ExperimentConfig, layout: RunLayout) -> StageStatus:
    from oodscale.diffusion.generators import GENERATORS, MODEL_CARD

    if not GENERATORS[cfg.generate.generator].trained_here:
        return StageStatus("train-diffusion", SKIPPED, f"generate.generator="
                           f"{cfg.generate.generator} is pretrained", "nothing")
    epochs, storage = cfg.diffusion.epochs, layout.storage
    card_path = f"{layout.diffusion_dir}/{MODEL_CARD}"
    if storage.exists(card_path):
        card = json.loads(storage.read_bytes(card_path))
        return StageStatus("train-diffusion", FINISHED, f"{card['epochs']} epochs, final loss "
                           f"{card['final_loss']:.4f}, model {card['model_hash']}", "nothing")
    state = latest_checkpoint_state(layout, f"{cfg.name}-diffusion")
    if state is None:
        return StageStatus("train-diffusion", MISSING, "no checkpoint",
                           f"trains {epochs} epochs")
    done = state["epoch"] + 1
    return StageStatus("train-diffusion", PARTIAL, f"{done} of {epochs} epochs checkpointed",
                       f"resumes at epoch {done + 1} of {epochs}")


def _generate(cfg: ExperimentConfig, layout: RunLayout) -> StageStatus:
    from oodscale.outlier_sources import generator_sources, synthetic_dirname

    default, total = cfg.generate.guidance, cfg.generate.num_shards
    sources = generator_sources(cfg.train.outlier_sources, default)
    guidances = {s.guidance for s in sources} | {default}
    parts, missing = [], 0
    for g in sorted(guidances, key=lambda g: (g != default, g)):
        name = synthetic_dirname(g)
        manifest = try_read_manifest(layout.storage, layout.synthetic_variant(name))
        drawn = 0 if manifest is None else len(manifest.shards)
        parts.append(f"{name} {drawn} of {total} shards")
        missing += max(0, total - drawn)
    count = len(guidances) * total
    return StageStatus("generate", _state(count - missing, count), ", ".join(parts),
                       f"draws the {missing} missing shard(s)" if missing else "nothing")


def _train(cfg: ExperimentConfig, layout: RunLayout) -> StageStatus:
    from oodscale.classify.cards import CARD
    from oodscale.classify.grid import grid

    storage, epochs = layout.storage, cfg.train.epochs
    cells = [s.name for s in grid(cfg)]
    finished = [c for c in cells if storage.exists(f"{layout.classifier_dir(c)}/{CARD}")]
    pending = [c for c in cells if c not in finished]
    resumes = {}
    if storage.exists(layout.ray_train_dir):
        groups = storage.fs.get_file_info(pafs.FileSelector(layout.ray_train_dir))
        for group in groups:
            state = latest_checkpoint_state(layout, group.path.rsplit("/", 1)[-1])
            if state is not None and state.get("run") in pending:
                resumes[state["run"]] = state["epoch"] + 1
    detail = f"{len(finished)} of {len(cells)} classifiers finished" + "".join(
        f"; {run} at epoch {done} of {epochs} (checkpoint)" for run, done in resumes.items())
    rerun = "nothing" if not pending else f"trains {len(pending)} classifier(s)" + "".join(
        f", resuming {run} at epoch {done + 1}" if done < epochs else
        f", publishing {run} from its last checkpoint" for run, done in resumes.items())
    state = _state(len(finished), len(cells))
    if state == MISSING and resumes:
        state = PARTIAL
    return StageStatus("train", state, detail, rerun)


def _calibrate(cfg: ExperimentConfig, layout: RunLayout, trained: list[str],
               refused: str | None) -> StageStatus:
    from oodscale.evaluate.calibration_card import is_current

    current = [r for r in trained if is_current(layout.storage, layout.classifier_dir(r), cfg)]
    todo = len(trained) - len(current)
    rerun = refused or (f"calibrates {todo} classifier(s)" if todo else "nothing")
    return StageStatus("calibrate", _state(len(current), len(trained)) if trained else MISSING,
                       f"{len(current)} of {len(trained)} trained classifiers have current "
                       f"thresholds ({100 * cfg.detector.tpr:g}% of ID validation accepted)",
                       rerun)


def _evaluate(layout: RunLayout, trained: list[str], refused: str | None) -> StageStatus:
    import pyarrow.parquet as pq

    storage, path = layout.storage, f"{layout.eval_dir}/results.parquet"
    rerun = refused or f"scores {len(trained)} classifier(s) and rewrites the report"
    if not storage.exists(path):
        return StageStatus("evaluate", MISSING, "no results.parquet", rerun)
    with storage.fs.open_input_file(path) as f:
        scored = set(pq.read_table(f, columns=["run"]).column("run").to_pylist())
    unscored = [r for r in trained if r not in scored]
    state = PARTIAL if unscored or refused else FINISHED
    detail = f"results.parquet holds {len(scored)} classifier(s)" + (
        f", not {', '.join(unscored)}" if unscored else "")
    return StageStatus("evaluate", state, detail, rerun)


def experiment_status(cfg: ExperimentConfig, layout: RunLayout) -> list[StageStatus]:
    """One entry per stage of `oodscale run`, in order."""
    from oodscale.outlier_sources import generator_sources

    stages = [_prepare(cfg, layout)]
    if generator_sources(cfg.train.outlier_sources, cfg.generate.guidance):
        stages += [_train_diffusion(cfg, layout), _generate(cfg, layout)]
    else:
        stages += [StageStatus(s, SKIPPED, "no generator outlier source in train.outliers",
                               "nothing") for s in ("train-diffusion", "generate")]
    from oodscale.classify.cards import trained_runs

    trained = trained_runs(layout.storage, layout.classifiers_dir)  # earlier grids' too
    train = _train(cfg, layout)
    refused = None if train.state == FINISHED else "refuses until every grid cell is trained"
    return [*stages, train, _calibrate(cfg, layout, trained, refused),
            _evaluate(layout, trained, refused)]


def render_status(cfg: ExperimentConfig, layout: RunLayout) -> str:
    lines = [f"experiment {cfg.name} at {layout.storage.uri_of(layout.storage.path(cfg.name))}"]
    for s in experiment_status(cfg, layout):
        lines.append(f"  {s.stage:<16} {s.state:<10} {s.detail}")
        lines.append(f"  {'':<16} {'':<10} rerun: {s.rerun}")
    return "\n".join(lines)
