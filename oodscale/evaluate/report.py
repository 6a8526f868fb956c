"""Turn the long ``scores.parquet`` frame into ``results.parquet`` rows, a Markdown report, plots.

Everything here is derived from the two frames alone, so a report can be rebuilt from stored
Parquet files without models or Ray.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from oodscale.errors import InputError
from oodscale.evaluate.metrics import id_accuracy, mean_std, ood_metrics
from oodscale.outlier_sources import NO_OUTLIERS

RUN_KEYS = ["run", "loss", "outliers", "seed"]
METRICS = ["fpr95", "auroc", "aupr_in", "aupr_out"]
METRIC_LABELS = {"fpr95": "FPR95", "auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out"}
SUMMARY_LABELS = {**METRIC_LABELS, "fpr95_id_positive": "FPR95 (ID+)"}
RESULT_COLUMNS = [
    *RUN_KEYS, "score_name", "ood_set", "group", *METRICS, "fpr95_id_positive", "id_acc",
]
SCORE_COLUMNS = [*RUN_KEYS, "score_name", "dataset", "sample", "is_ood", "score", "label", "pred"]
ROW_KEYS = ["loss", "outliers", "score_name"]
ID_ACC_LABEL = "ID acc"
GROUPS = ("near", "far")


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{what} frame lacks column(s) {missing}")


def aggregate(scores: pd.DataFrame, groups: dict[str, str]) -> pd.DataFrame:
    """One ``results.parquet`` row per (run, score name, OOD set); unlisted sets count as far."""
    _require(scores, SCORE_COLUMNS, "scores")
    bad = {k: v for k, v in groups.items() if v not in GROUPS}
    if bad:
        raise InputError(f"groups must map OOD sets to 'near' or 'far', got {bad}")

    is_id = scores["dataset"] == "id"
    id_acc = {
        run: id_accuracy(part["label"].to_numpy(), part["pred"].to_numpy())
        for run, part in scores[is_id].groupby("run", sort=False)
    }
    rows = []
    for keys, part in scores.groupby([*RUN_KEYS, "score_name"], sort=True):
        part_id = part["dataset"] == "id"
        if not part_id.any():
            raise InputError(f"no ID rows (dataset == 'id') for run/score {keys}")
        id_scores = part.loc[part_id, "score"].to_numpy()
        for ood_set, ood in part[~part_id].groupby("dataset", sort=True):
            rows.append(
                {
                    **dict(zip([*RUN_KEYS, "score_name"], keys, strict=True)),
                    "ood_set": ood_set,
                    "group": groups.get(ood_set, "far"),
                    **ood_metrics(id_scores, ood["score"].to_numpy()),
                    "id_acc": id_acc[keys[0]],
                }
            )
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def _per_seed(results: pd.DataFrame) -> pd.DataFrame:
    """Per run and score: each group's metrics averaged over its OOD sets (wide columns)."""
    keys = [*RUN_KEYS, "score_name"]
    metrics = [*METRICS, "fpr95_id_positive"]  # both FPR95 conventions side by side
    wide = results.groupby([*keys, "group"])[metrics].mean().unstack("group")
    wide.columns = [f"{g} {SUMMARY_LABELS[m]}" for m, g in wide.columns]
    ordered = [f"{g} {SUMMARY_LABELS[m]}" for g in GROUPS for m in metrics]
    wide = wide[[c for c in ordered if c in wide.columns]]
    wide[ID_ACC_LABEL] = results.groupby(keys)["id_acc"].first()
    return wide.reset_index()


def _summary_stats(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Means, stds over seeds, and seed counts per (loss, outliers, score name)."""
    _require(results, RESULT_COLUMNS, "results")
    if results.empty:
        raise InputError("results frame is empty: nothing to summarise")
    per_seed = _per_seed(results)
    value_cols = [c for c in per_seed.columns if c not in [*RUN_KEYS, "score_name"]]
    grouped = per_seed.groupby(ROW_KEYS, sort=True)[value_cols]
    means = grouped.agg(lambda v: mean_std(v.dropna())[0] if v.notna().any() else np.nan)
    stds = grouped.agg(lambda v: mean_std(v.dropna())[1] if v.notna().any() else np.nan)
    return means, stds, per_seed.groupby(ROW_KEYS, sort=True).size()


def _fmt(mean: float, std: float, n: int) -> str:
    if np.isnan(mean):
        return "-"
    return f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {std:.1f}"


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Near/far means of each metric plus ID accuracy, as "mean ± std" strings over seeds."""
    means, stds, counts = _summary_stats(results)
    table = pd.DataFrame(
        {
            col: [_fmt(means.at[i, col], stds.at[i, col], counts[i]) for i in means.index]
            for col in means.columns
        },
        index=means.index,
    )
    return table.reset_index()


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (``to_markdown`` needs tabulate, which is not a dependency)."""
    cells = [[str(c) for c in frame.columns]]
    cells += [[str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in frame.columns) + "|")
    return "\n".join(lines)


def _bold(table: pd.DataFrame, best: pd.DataFrame | None) -> pd.DataFrame:
    """Markdown bold on the cells `best` marks."""
    return table if best is None else table.mask(best, "**" + table.astype(str) + "**")


def head_scores(loss: str) -> tuple[str, ...]:
    """The scores that read a loss's own head output (the loss table's row)."""
    from oodscale.classify.loss_table import LOSSES

    return LOSSES[loss].head_scores if loss in LOSSES else ()


def primary_scores(results: pd.DataFrame,
                   candidates: dict[str, Sequence[str]] | None = None) -> dict[str, str]:
    """Per loss, the score (of its `candidates`, else any) with the lowest FPR95, near and far
    weighted equally: each group's mean over its OOD sets first, then the groups' mean, then
    the mean over the loss's runs. A mean over sets would let the many noise sets decide."""
    per_group = results.groupby(["loss", "score_name", "run", "group"])["fpr95"].mean()
    per_run = per_group.groupby(["loss", "score_name", "run"]).mean()
    mean_fpr = per_run.groupby(["loss", "score_name"]).mean().reset_index()
    if candidates is not None:
        mean_fpr = mean_fpr[[score in candidates.get(loss, ()) for loss, score in
                             zip(mean_fpr["loss"], mean_fpr["score_name"], strict=True)]]
    best = mean_fpr.sort_values(["loss", "fpr95", "score_name"]).groupby("loss").head(1)
    return dict(zip(best["loss"], best["score_name"], strict=True))


# The two protocols every comparison is made under, in the report's order.
PROTOCOLS = {
    "paper": "the paper's: each head through its own output (softmax: `msp`; cosine heads: "
             "their cosine logits, `maxcos` or `energy`), where OE acts",
    "openood": "OpenOOD v1.5's: any score, kNN and Mahalanobis on the embedding included",
}


def protocol_scores(selection: pd.DataFrame) -> dict[str, dict[str, str]]:
    """protocol → loss → its score, each chosen on `selection` (the validation results)."""
    evaluated = set(selection["score_name"])
    heads = {loss: [s for s in head_scores(loss) if s in evaluated]
             for loss in selection["loss"].unique()}
    return {"paper": primary_scores(selection, heads), "openood": primary_scores(selection)}


def _per_set_table(results: pd.DataFrame, primary: dict[str, str]) -> pd.DataFrame:
    """Every OOD set for each loss's primary score, mean ± std over seeds."""
    chosen = results[results["score_name"] == results["loss"].map(primary)]
    rows = []
    keys = ["loss", "outliers", "score_name", "group", "ood_set"]
    for key, part in sorted(
        chosen.groupby(keys), key=lambda kv: (*kv[0][:3], GROUPS.index(kv[0][3]), kv[0][4])
    ):
        row = dict(zip(keys, key, strict=True))
        for m in METRICS:
            row[METRIC_LABELS[m]] = _fmt(*mean_std(part[m]), len(part))
        row["FPR95 (ID+)"] = _fmt(*mean_std(part["fpr95_id_positive"]), len(part))
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class Table:
    """One report table: display strings, which cells to mark (or None), a note above it."""

    title: str
    frame: pd.DataFrame
    best: pd.DataFrame | None = None
    note: str = ""


COMPARISON_LABELS = {"vs_none": "its loss without outliers",
                     "vs_softmax": "softmax without outliers"}


def _interval(row: pd.Series) -> str:
    return f"{row['diff']:+.1f} [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}]"


def comparison_table(comparisons: pd.DataFrame, protocol: str) -> Table:
    """One row per (cell, reference): each group's and metric's paired difference with its
    95 % CI; bold where the interval excludes zero on the better side."""
    part = comparisons[comparisons["protocol"] == protocol]
    keys = ["comparison", "loss", "outliers", "score_name", "ref_loss", "ref_outliers",
            "ref_score_name"]
    columns = [(g, m) for g in (*GROUPS, "id") for m in ("fpr95", "auroc", "id_acc")
               if ((part["group"] == g) & (part["metric"] == m)).any()]
    rows, marks = [], []
    for key, cell in part.groupby(keys, sort=False):
        info = dict(zip(keys, key, strict=True))
        row = {"cell": f"{info['loss']}-{info['outliers']} ({info['score_name']})",
               "against": f"{info['ref_loss']}-{info['ref_outliers']} "
                          f"({info['ref_score_name']})",
               "seeds": str(int(cell["seeds"].iloc[0]))}
        mark = {"cell": False, "against": False, "seeds": False}
        for g, m in columns:
            hit = cell[(cell["group"] == g) & (cell["metric"] == m)]
            name = ID_ACC_LABEL + " Δ" if m == "id_acc" else f"{g} {METRIC_LABELS[m]} Δ"
            row[name] = _interval(hit.iloc[0]) if len(hit) else "-"
            mark[name] = bool(len(hit)) and hit.iloc[0]["verdict"] == "better"
        rows.append(row)
        marks.append(mark)
    frame = pd.DataFrame(rows)
    return Table(f"Paired differences, {protocol} protocol (95 % CI)", frame,
                 pd.DataFrame(marks, columns=frame.columns) if rows else None,
                 "Each cell against " + " and against ".join(COMPARISON_LABELS.values()) +
                 ", seed by seed and image by image: difference of the means [95 % bootstrap "
                 "interval over seeds and test images]. FPR95 lower and AUROC higher is better; "
                 "**bold**: the interval excludes zero on the better side. Everything else is "
                 "undecided or worse.")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


def _save(fig: Figure, path: str) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def _grid(n: int, cols: int = 3, panel: tuple[float, float] = (4.2, 3.4)) -> tuple[Figure, list]:
    cols = min(n, cols)
    rows = -(-n // cols)
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _roc_plot(scores: pd.DataFrame, loss: str, score_name: str, path: str) -> None:
    """ROC (OOD positive) per OOD set, one line per run of the loss, for its primary score."""
    part = scores[(scores["loss"] == loss) & (scores["score_name"] == score_name)]
    sets = sorted(part.loc[part["dataset"] != "id", "dataset"].unique())
    fig, axes = _grid(len(sets))
    for ax, ood_set in zip(axes, sets, strict=True):
        for run, run_part in part.groupby("run", sort=True):
            sel = run_part[run_part["dataset"].isin(["id", ood_set])]
            fpr, tpr, _ = roc_curve(sel["dataset"] == ood_set, -sel["score"].to_numpy())
            ax.plot(fpr, tpr, lw=1.2, label=str(run))
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        ax.set(title=ood_set, xlabel="FPR (ID flagged OOD)", ylabel="TPR (OOD detected)")
        ax.legend(fontsize=6)
    fig.suptitle(f"ROC, loss={loss}, score={score_name}")
    _save(fig, path)


def _hist_plot(scores: pd.DataFrame, run: str, score_name: str, path: str) -> None:
    """ID vs each OOD set's score distribution for one run, on shared bins."""
    part = scores[(scores["run"] == run) & (scores["score_name"] == score_name)]
    id_scores = part.loc[part["dataset"] == "id", "score"].to_numpy()
    sets = sorted(part.loc[part["dataset"] != "id", "dataset"].unique())
    fig, axes = _grid(len(sets))
    for ax, ood_set in zip(axes, sets, strict=True):
        ood_scores = part.loc[part["dataset"] == ood_set, "score"].to_numpy()
        bins = np.histogram_bin_edges(np.concatenate([id_scores, ood_scores]), bins=40)
        ax.hist(id_scores, bins=bins, alpha=0.6, density=True, label="ID")
        ax.hist(ood_scores, bins=bins, alpha=0.6, density=True, label=ood_set)
        ax.set(title=ood_set, xlabel=f"{score_name} (higher = more ID)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Scores, run={run}")
    _save(fig, path)


def _bar_plot(results: pd.DataFrame, primary: dict[str, str], path: str) -> None:
    """FPR95 per loss, one bar per outlier setting (no outliers first), near and far panels."""
    chosen = results[results["score_name"] == results["loss"].map(primary)]
    present = [g for g in GROUPS if (chosen["group"] == g).any()]
    losses = sorted(chosen["loss"].unique())
    settings = sorted(chosen["outliers"].unique(), key=lambda s: (s != NO_OUTLIERS, s))
    width = 0.8 / len(settings)
    bars_per_panel = len(losses) * len(settings)
    # many bars: the panels one above the other, each wide enough for every bar
    fig, axes = (_grid(len(present), 1, (max(8.0, 0.3 * bars_per_panel), 3.6))
                 if bars_per_panel > 12 else _grid(len(present)))
    for ax, group in zip(axes, present, strict=True):
        per_run = chosen[chosen["group"] == group].groupby(["loss", "outliers", "run"])["fpr95"]
        stats = per_run.mean().groupby(["loss", "outliers"]).agg(
            mean="mean", std=lambda v: v.std(ddof=0)
        )
        for i, setting in enumerate(settings):
            keys = [(loss, setting) for loss in losses]
            heights = [stats["mean"].get(k, np.nan) for k in keys]
            errs = [stats["std"].get(k, 0.0) for k in keys]
            xs = np.arange(len(losses)) + (i - (len(settings) - 1) / 2) * width
            bars = ax.bar(xs, heights, width, yerr=errs, capsize=2, label=f"outliers={setting}")
            ax.bar_label(bars, fmt="%.1f", fontsize=6 if bars_per_panel > 12 else 7)
        ax.set_xticks(np.arange(len(losses)), [f"{lo}\n({primary[lo]})" for lo in losses])
        ax.set(title=f"{group}-OOD", ylabel="FPR95 (%) ↓")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)


def _forest_plot(comparisons: pd.DataFrame, protocol: str, path: str) -> bool:
    """Each cell's paired FPR95 difference with its 95 % CI, near and far side by side; False
    where there is nothing to draw."""
    part = comparisons[(comparisons["protocol"] == protocol) & (comparisons["metric"] == "fpr95")]
    present = [g for g in GROUPS if (part["group"] == g).any()]
    if part.empty:
        return False
    colours = {"better": "tab:green", "worse": "tab:red", "undecided": "tab:grey"}
    labels = list(dict.fromkeys(
        f"{r.loss}-{r.outliers} − {r.ref_loss}-{r.ref_outliers}" for r in part.itertuples()))
    fig, axes = _grid(len(present), 2, (5.0, 0.9 + 0.32 * len(labels)))
    for ax, group in zip(axes, present, strict=True):
        rows = part[part["group"] == group]
        for r in rows.itertuples():
            y = labels.index(f"{r.loss}-{r.outliers} − {r.ref_loss}-{r.ref_outliers}")
            ax.errorbar(r.diff, y, xerr=[[r.diff - r.ci_low], [r.ci_high - r.diff]], fmt="o",
                        color=colours[r.verdict], capsize=3, ms=4)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels),
                      fontsize=7)
        ax.invert_yaxis()
        ax.set(title=f"{group}-OOD", xlabel="FPR95 difference (points) ← better")
    fig.suptitle(f"Paired FPR95 differences, {protocol} protocol, 95 % CI "
                 "(green: better, red: worse, grey: undecided)", fontsize=9)
    _save(fig, path)
    return True


def conventions(results: pd.DataFrame, scores: pd.DataFrame) -> list[str]:
    """The report's convention notes, one Markdown sentence group each."""
    from oodscale.evaluate.score_table import SCORES

    sets = {g: sorted(results.loc[results["group"] == g, "ood_set"].unique()) for g in GROUPS}
    listing = "; ".join(f"{g}: {', '.join(s) if s else '(none)'}" for g, s in sets.items())
    reads = "; ".join(f"`{name}` reads {SCORES[name].reads}"
                      for name in sorted(scores["score_name"].unique()) if name in SCORES)
    return [
        "OOD is the positive class (OpenOOD v1.5). Scores follow OpenOOD's sign: "
        "higher score = more in-distribution (`score` in `scores.parquet`); pytorch-ood's "
        "convention (higher = more OOD) is its negation, `-score`.",
        "FPR95: share of ID test samples flagged OOD at the threshold that detects 95 % of "
        "the OOD samples. AUROC and AUPR-Out rank OOD as positive; AUPR-In ranks ID as "
        "positive.",
        "FPR95 (ID+), the energy/ODIN papers' convention with ID positive: share of OOD "
        "samples accepted at the threshold that accepts 95 % of ID; in every table beside "
        "FPR95 and as `fpr95_id_positive` in `results.parquet`.",
        "All values are in %. Near/far: each group's metrics are averaged over its OOD "
        "sets, then mean ± std (ddof=0) over seeds. " + listing + ".",
        "What each score reads: " + reads + ". OE trains the head's output; no loss term "
        "trains the raw embedding's norm.",
        "A difference counts only with its interval: a paired difference (same seed, same "
        "initial weights and ID batches, same test images) with a 95 % bootstrap interval over "
        "seeds and test images; inside the interval it is undecided. No table marks a best "
        "value by rank alone.",
    ]


QUALITY_LABELS = {
    "reference_test_accuracy": "reference classifier's accuracy on ID test images (%)",
    "conditional_accuracy": "(a) its accuracy on class-conditional samples (%)",
    "frechet_distance": "(b) Fréchet distance, samples vs ID test images, in its embedding",
    "mix_mass_a": "(c) label-mixup samples: mean probability of class a",
    "mix_mass_b": "(c) label-mixup samples: mean probability of class b",
    "mix_pair_mass": "(c) label-mixup samples: mean probability of a or b",
    "mix_weaker_share": "(c) the weaker of a, b's share of their mass (0.5: evenly between)",
    "mix_entropy": "(c) entropy of the reference's prediction (nats)",
}


def quality_table(quality: dict[str, Any]) -> Table:
    """The generator's sample quality from its card (`diffusion/quality.py`)."""
    rows = [{"figure": label, "value": f"{quality[key]:.3g}"}
            for key, label in QUALITY_LABELS.items() if key in quality]
    return Table("Generator sample quality", pd.DataFrame(rows), None,
                 f"Measured when the generator was trained (`diffusion.quality_per_class`), by "
                 f"a reference classifier ({quality.get('reference', 'see model.json')}) on "
                 f"{quality.get('class_samples', '?')} class-conditional and "
                 f"{quality.get('mix_samples', 0)} label-mixup samples: a weak generator reads "
                 "as low (a), high (b); between-class outliers as (c) mass split over a and b.")


DRAWN_LABELS = {"mix_samples": "outliers read", "mix_pair_mass": "mass on a or b",
                "mix_weaker_share": "weaker share", "mix_entropy": "entropy (nats)"}


def drawn_table(drawn: dict[str, dict[str, Any]]) -> Table:
    """Per set of outliers the grid trains on, how between its two classes the reference
    finds it (`generate.quality_samples`, recorded in the shards' manifest)."""
    rows = [{"outliers": name, **{label: f"{figures[key]:,}" if key == "mix_samples"
                                  else f"{figures[key]:.3g}"
                                  for key, label in DRAWN_LABELS.items() if key in figures}}
            for name, figures in drawn.items()]
    return Table("Drawn outliers, read by the reference classifier", pd.DataFrame(rows), None,
                 "Measured on the shards the classifiers train on (`generate.quality_samples` "
                 "of each): a label-mixup outlier between its classes a and b puts its mass "
                 "on a or b, split evenly (weaker share 0.5) and with high entropy; a clean "
                 "class-a sample has weaker share 0.")


def _set_table(scores: pd.DataFrame, results: pd.DataFrame,
               set_sources: dict[str, str] | None) -> Table:
    """Each test set's size, group and number of distinct source images."""
    one = scores[(scores["run"] == scores["run"].iloc[0])
                 & (scores["score_name"] == scores["score_name"].iloc[0])]
    sizes = one.groupby("dataset").size()
    groups = dict(zip(results["ood_set"], results["group"], strict=False))
    rows = [{"set": name, "group": "ID" if name == "id" else groups.get(name, "far"),
             "images": f"{int(sizes[name]):,}",
             "sources": (set_sources or {}).get(name, "-")}
            for name in sorted(sizes.index, key=lambda n: (n != "id", groups.get(n, ""), n))]
    return Table("Test sets", pd.DataFrame(rows))


@dataclass
class ReportContent:
    """What report.md and report.html show, built once from the two frames (plots rendered)."""

    title: str
    protocols: dict[str, dict[str, str]]  # protocol → loss → its score
    selected_on: str  # which sets chose the scores, for the reader
    conventions: list[str]
    tables: list[Table]
    figures: list[tuple[str, str]]  # (caption, path relative to the report's folder)
    comparisons: pd.DataFrame  # intervals.COMPARISON_COLUMNS
    claims: pd.DataFrame  # claims.CLAIM_COLUMNS

    @property
    def primary(self) -> dict[str, str]:
        """OpenOOD's choice per loss (what the plots and per-set table show)."""
        return self.protocols["openood"]


def _selected_on(selection: pd.DataFrame | None) -> str:
    if selection is None:
        return ("the test sets themselves (this experiment has no validation sets: prepare it "
                "with data.val_fraction > 0 and an OOD validation set), so the main tables are "
                "optimistic")
    return ("the validation sets alone: the ID validation split (data/id/val) against the OOD "
            "validation sets " + ", ".join(f"`{s}`" for s in sorted(selection["ood_set"].unique()))
            + " (data/ood-val/, disjoint from every test image); no test set chose anything")


def protocol_note(protocol: str, chosen: dict[str, str], selected_on: str) -> str:
    return (f"Protocol: {PROTOCOLS[protocol]}. Each loss's score has the lowest FPR95 with the "
            "near and far groups weighted equally (each group's mean over its sets first), on "
            + selected_on + ": " + ", ".join(f"{loss}: `{s}`" for loss, s in chosen.items()) +
            ". The ambiguity filter's τ, the guidance scale, the λ distribution and λ_oe are "
            "fixed in the config, not chosen on any data.")


def build_report(
    results: pd.DataFrame,
    scores: pd.DataFrame,
    out_dir: str,
    title: str,
    extra_images: dict[str, str] | None = None,
    selection: pd.DataFrame | None = None,
    set_sources: dict[str, str] | None = None,
    n_boot: int = 1000,
    boot_seed: int = 0,
    quality: dict[str, Any] | None = None,
) -> ReportContent:
    """Tables, intervals and claims from the frames; plots rendered to ``out_dir/plots/*.png``.

    ``selection`` (``val_results.parquet``: the same runs on the ID and OOD validation sets)
    chooses each loss's score under both protocols; without it the test results do, which is
    optimistic. ``n_boot`` bootstrap draws give every paired interval.
    """
    from oodscale.evaluate.claims import claims_summary, decide_claims
    from oodscale.evaluate.intervals import comparisons as paired_comparisons

    plots_dir = os.path.join(out_dir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    protocols = protocol_scores(results if selection is None else selection)
    selected_on = _selected_on(selection)
    groups = dict(zip(results["ood_set"], results["group"], strict=False))
    comparisons = paired_comparisons(scores, groups, protocols, n_boot, boot_seed)
    claims = decide_claims(comparisons)

    figures: list[tuple[str, str]] = []
    for protocol in PROTOCOLS:
        rel = f"plots/paired_fpr95_{protocol}.png"
        if _forest_plot(comparisons, protocol, os.path.join(out_dir, rel)):
            figures.append((f"Paired FPR95 differences with 95 % CI, {protocol} protocol", rel))
    primary = protocols["openood"]
    plotted = set()
    for protocol in PROTOCOLS:
        for loss, score_name in protocols[protocol].items():
            if (loss, score_name) in plotted:
                continue
            plotted.add((loss, score_name))
            rel = f"plots/roc_{_slug(loss)}_{_slug(score_name)}.png"
            _roc_plot(scores, loss, score_name, os.path.join(out_dir, rel))
            figures.append((f"ROC curves, {loss} ({score_name})", rel))
    for loss, score_name in primary.items():
        runs = results[results["loss"] == loss].sort_values(["outliers", "seed", "run"])
        for _, first in runs.groupby("outliers", sort=True).head(1).iterrows():
            rel = f"plots/hist_{_slug(first['run'])}_{_slug(score_name)}.png"
            _hist_plot(scores, first["run"], score_name, os.path.join(out_dir, rel))
            figures.append((f"Score histograms, run {first['run']} ({score_name})", rel))
    for protocol, chosen in protocols.items():
        rel = f"plots/fpr95_outliers_{protocol}.png"
        _bar_plot(results, chosen, os.path.join(out_dir, rel))
        figures.append((f"FPR95 with and without outliers, {protocol} protocol", rel))
    figures += [(caption, os.path.relpath(path, out_dir))
                for caption, path in (extra_images or {}).items()]

    tables = []
    for protocol, chosen in protocols.items():
        picked = results[results["score_name"] == results["loss"].map(chosen)]
        tables.append(Table(f"Main table, {protocol} protocol", summary_table(picked),
                            note=protocol_note(protocol, chosen, selected_on)))
        if (comparisons["protocol"] == protocol).any():  # a grid without pairs has none
            tables.append(comparison_table(comparisons, protocol))
    summary = claims_summary(claims)
    if len(summary):
        tables.append(Table("The paper's claims, decided", summary, None,
                            "Computed from the paired intervals above (`claims.parquet`): "
                            "holds where every loss's interval excludes zero on the claimed "
                            "side, fails where one excludes it on the other, else undecided."))
    if quality and set(quality) - {"drawn"}:
        tables.append(quality_table(quality))
    if quality and quality.get("drawn"):
        tables.append(drawn_table(quality["drawn"]))
    tables += [
        _set_table(scores, results, set_sources),
        Table("Every score (mean over the OOD sets of each group)", summary_table(results)),
        Table("Per OOD set (OpenOOD protocol's score per loss)", _per_set_table(results, primary)),
    ]
    return ReportContent(title, protocols, selected_on, conventions(results, scores), tables,
                         figures, comparisons, claims)


def markdown_report(content: ReportContent) -> str:
    """report.md's text: conventions, the tables, then every figure."""
    sections = [f"# {content.title}", "", "## Conventions", "",
                *[f"- {line}" for line in content.conventions]]
    for table in content.tables:
        sections += ["", f"## {table.title}", ""]
        if table.note:
            sections += [table.note, ""]
        sections.append(markdown_table(_bold(table.frame, table.best)))
    sections += ["", "## Plots", ""]
    sections += [f"![{caption}]({rel})\n" for caption, rel in content.figures]
    return "\n".join(sections).rstrip() + "\n"


def write_report(
    results: pd.DataFrame,
    scores: pd.DataFrame,
    out_dir: str,
    title: str,
    extra_images: dict[str, str] | None = None,
    provenance: dict[str, Any] | None = None,
    selection: pd.DataFrame | None = None,
    set_sources: dict[str, str] | None = None,
    n_boot: int = 1000,
    quality: dict[str, Any] | None = None,
) -> str:
    """Write ``report.md``, ``comparisons.parquet``, ``claims.parquet`` and ``plots/*.png``
    under a local ``out_dir``, and with ``provenance`` (`report_html.provenance`) the
    self-contained ``report.html`` too.

    Returns the paper protocol's main table and the claims, for a CLI to print.
    """
    content = build_report(results, scores, out_dir, title, extra_images, selection,
                           set_sources, n_boot, quality=quality)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown_report(content))
    content.comparisons.to_parquet(os.path.join(out_dir, "comparisons.parquet"), index=False)
    content.claims.to_parquet(os.path.join(out_dir, "claims.parquet"), index=False)
    if provenance is not None:
        from oodscale.evaluate.report_html import write_html  # it imports this module

        write_html(content, out_dir, provenance)
    shown = [t for t in content.tables if t.title.startswith("Main table")][:1]
    shown += [t for t in content.tables if t.title.startswith("The paper's claims")]
    return "\n\n".join(f"{t.title}\n{markdown_table(_bold(t.frame, t.best))}" for t in shown)
