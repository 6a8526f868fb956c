"""Does a change move the OOD metrics by more than the seed-to-seed spread?

    .venv/bin/python bench/compare_runs.py runs/digits/eval runs/digits_dpm/eval \
        --label-a "DDIM 40" --label-b "DPM-Solver++ 20"

Reads two experiments' `results.parquet` (same grid, several seeds each) and prints, per loss x
outliers x score x OOD group, the mean over seeds of FPR95 and AUROC in each, the difference of
the means, and the spread (max - min over seeds, the larger of the two experiments'). A row whose
difference exceeds its spread is marked; the summary counts them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

KEYS = ["loss", "outliers", "score_name", "group"]


def per_seed(eval_dir: Path) -> pd.DataFrame:
    """Near/far means per run (one row per loss x outliers x score x group x seed)."""
    results = pd.read_parquet(eval_dir / "results.parquet")
    return results.groupby([*KEYS, "seed"], as_index=False)[["fpr95", "auroc"]].mean()


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    stats = []
    for frame in (a, b):
        g = frame.groupby(KEYS)
        stats.append(pd.DataFrame({
            "fpr95": g["fpr95"].mean(), "fpr95_spread": g["fpr95"].max() - g["fpr95"].min(),
            "auroc": g["auroc"].mean(), "auroc_spread": g["auroc"].max() - g["auroc"].min(),
            "seeds": g["seed"].nunique()}))
    joined = stats[0].add_suffix("_a").join(stats[1].add_suffix("_b"), how="inner")
    for metric in ("fpr95", "auroc"):
        joined[f"{metric}_diff"] = joined[f"{metric}_b"] - joined[f"{metric}_a"]
        spreads = [f"{metric}_spread_a", f"{metric}_spread_b"]
        joined[f"{metric}_spread"] = joined[spreads].max(axis=1)
        joined[f"{metric}_within"] = joined[f"{metric}_diff"].abs() <= joined[f"{metric}_spread"]
    return joined.reset_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_a", type=Path)
    parser.add_argument("eval_b", type=Path)
    parser.add_argument("--label-a", default="A")
    parser.add_argument("--label-b", default="B")
    args = parser.parse_args(argv)
    table = compare(per_seed(args.eval_a), per_seed(args.eval_b))
    if table.empty:
        print("the two experiments share no loss x outliers x score x group", file=sys.stderr)
        return 2
    print(f"| loss | outliers | score | group | FPR95 {args.label_a} | FPR95 {args.label_b} | "
          f"diff | seed spread | AUROC {args.label_a} | AUROC {args.label_b} | diff | "
          "seed spread |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table.itertuples():
        mark = {m: "" if getattr(r, f"{m}_within") else " **!**" for m in ("fpr95", "auroc")}
        print(f"| {r.loss} | {r.outliers} | {r.score_name} | {r.group} | {r.fpr95_a:.1f} | "
              f"{r.fpr95_b:.1f} | {r.fpr95_diff:+.1f}{mark['fpr95']} | {r.fpr95_spread:.1f} | "
              f"{r.auroc_a:.1f} | {r.auroc_b:.1f} | {r.auroc_diff:+.1f}{mark['auroc']} | "
              f"{r.auroc_spread:.1f} |")
    n = len(table)
    seeds = f"{int(table['seeds_a'].min())}/{int(table['seeds_b'].min())}"
    print(f"\n{n} rows (seeds per row {seeds}): FPR95 within the seed spread in "
          f"{int(table['fpr95_within'].sum())}, AUROC in {int(table['auroc_within'].sum())}; "
          f"mean |diff| FPR95 {table['fpr95_diff'].abs().mean():.2f}, AUROC "
          f"{table['auroc_diff'].abs().mean():.2f} (points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
