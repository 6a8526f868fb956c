"""Which of the paper's claims hold on a finished benchmark run, near and far separately.

    .venv/bin/python bench/fashion_claims.py runs/fashion/eval

Reads `val_results.parquet` (to choose each loss's score: the lowest mean validation FPR95 over
its runs, as the report does) and `results.parquet` (the test numbers). For every loss x
outlier source it prints the test FPR95 per group (near; far real images; far noise) as the mean
over seeds with the seeds' min-max, and the ID accuracy. Then the two claims, cell by cell:
label-mixup OE vs no OE for each loss, and each metric loss vs softmax (both without OE). A
difference counts only when the seeds' ranges do not overlap ("beyond the seed spread").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

NOISE = {"gaussian", "uniform", "rademacher", "blobs"}
GROUPS = ("near", "far images", "far noise")


def primary_scores(val: pd.DataFrame) -> dict[str, str]:
    """Each loss's score with the lowest mean validation FPR95 over its runs and sets."""
    means = val.groupby(["loss", "score_name"])["fpr95"].mean().reset_index()
    return {loss: g.loc[g["fpr95"].idxmin(), "score_name"] for loss, g in means.groupby("loss")}


def per_seed(results: pd.DataFrame, scores: dict[str, str]) -> pd.DataFrame:
    """FPR95 per (loss, outliers, seed) and group at the loss's primary score, plus ID acc."""
    chosen = results[results.apply(lambda r: scores.get(r.loss) == r.score_name, axis=1)].copy()
    chosen["set_group"] = chosen.apply(
        lambda r: "near" if r.group == "near" else
        ("far noise" if r.ood_set in NOISE else "far images"), axis=1)
    keys = ["loss", "outliers", "seed"]
    fpr = chosen.groupby([*keys, "set_group"])["fpr95"].mean().unstack("set_group")
    fpr["ID acc"] = chosen.groupby(keys)["id_acc"].first()
    return fpr.reset_index()


def _cell(values: pd.Series) -> str:
    return f"{values.mean():.1f} ({values.min():.1f}-{values.max():.1f})"


def _verdict(a: pd.Series, b: pd.Series) -> str:
    """'better' when every seed of b beats every seed of a (lower FPR95), 'worse' the other
    way round, else 'within spread'; with the change of the means."""
    change = f"{b.mean() - a.mean():+.1f}"
    if b.max() < a.min():
        return f"better ({change})"
    if b.min() > a.max():
        return f"worse ({change})"
    return f"within spread ({change})"


def report(eval_dir: Path) -> str:
    val = pd.read_parquet(eval_dir / "val_results.parquet")
    scores = primary_scores(val)
    seeds = per_seed(pd.read_parquet(eval_dir / "results.parquet"), scores)
    lines = ["Primary scores (validation): "
             + ", ".join(f"{k} `{v}`" for k, v in sorted(scores.items())), "",
             "| loss | outliers | " + " | ".join(f"{g} FPR95" for g in GROUPS) + " | ID acc |",
             "|---|---|" + "---:|" * (len(GROUPS) + 1)]
    for (loss, outliers), g in seeds.groupby(["loss", "outliers"]):
        cells = " | ".join(_cell(g[c]) for c in (*GROUPS, "ID acc"))
        lines.append(f"| {loss} | {outliers} | {cells} |")

    def cell(loss: str, outliers: str) -> pd.DataFrame:
        return seeds[(seeds.loss == loss) & (seeds.outliers == outliers)]

    lines += ["", "| claim | cell | " + " | ".join(GROUPS) + " | ID acc |",
              "|---|---|" + "---|" * (len(GROUPS) + 1)]
    for loss in sorted(seeds.loss.unique()):
        base, oe = cell(loss, "none"), cell(loss, "labelmix")
        if len(base) and len(oe):
            verdicts = " | ".join(_verdict(base[c], oe[c]) for c in GROUPS)
            acc = f"{oe['ID acc'].mean() - base['ID acc'].mean():+.1f}"
            lines.append(f"| label-mixup OE helps | {loss} | {verdicts} | {acc} |")
    softmax = cell("softmax", "none")
    for loss in sorted(set(seeds.loss) - {"softmax"}):
        other = cell(loss, "none")
        if len(other) and len(softmax):
            verdicts = " | ".join(_verdict(softmax[c], other[c]) for c in GROUPS)
            acc = f"{other['ID acc'].mean() - softmax['ID acc'].mean():+.1f}"
            lines.append(f"| metric loss beats softmax (no OE) | {loss} | {verdicts} | {acc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_dir", type=Path)
    args = parser.parse_args(argv)
    missing = [f for f in ("val_results.parquet", "results.parquet")
               if not (args.eval_dir / f).exists()]
    if missing:
        print(f"{args.eval_dir} lacks {', '.join(missing)}: run `oodscale evaluate` first",
              file=sys.stderr)
        return 2
    print(report(args.eval_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
