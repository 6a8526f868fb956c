"""The paper's claims, decided from the paired intervals of `intervals.comparisons`.

Each claim is decided per loss, per group (near, far) and per metric: *holds* where the 95 %
interval excludes zero on the claimed side, *fails* where it excludes zero on the other, else
*undecided*. ID accuracy is "kept" where the interval of its change lies above −1 point
(`ID_ACC_MARGIN`). A claim over several losses holds where every loss holds and fails where any
fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from oodscale.evaluate.intervals import ID_ACC_MARGIN
from oodscale.outlier_sources import NO_OUTLIERS

CLAIM_COLUMNS = ["protocol", "claim", "loss", "outliers", "group", "metric", "diff", "ci_low",
                 "ci_high", "verdict"]
METRIC_NAMES = {"fpr95": "FPR95", "auroc": "AUROC", "id_acc": "ID acc"}
GROUP_ORDER = {"near": 0, "far": 1}


@dataclass(frozen=True)
class Claim:
    """Which comparison rows a claim reads, and how one row decides."""

    text: str
    rows: Callable[[pd.DataFrame, str], pd.Series]  # (comparisons, OE source) → row mask
    decide: Callable[[pd.Series], str]


def _performance(row: pd.Series) -> str:
    return {"better": "holds", "worse": "fails"}.get(row["verdict"], "undecided")


def _accuracy_kept(row: pd.Series) -> str:
    if row["ci_low"] > -ID_ACC_MARGIN:
        return "holds"
    return "fails" if row["ci_high"] < -ID_ACC_MARGIN else "undecided"


def _is_ood_metric(c: pd.DataFrame) -> pd.Series:
    return c["metric"].isin(["fpr95", "auroc"])


CLAIMS = (
    Claim("metric losses beat softmax (both without outliers)",
          lambda c, _: (c["comparison"] == "vs_softmax") & (c["outliers"] == NO_OUTLIERS)
          & _is_ood_metric(c), _performance),
    Claim("label-mixup OE improves each loss",
          lambda c, oe: (c["comparison"] == "vs_none") & (c["outliers"] == oe) & _is_ood_metric(c),
          _performance),
    Claim(f"label-mixup OE keeps ID accuracy (within {ID_ACC_MARGIN:g} point)",
          lambda c, oe: (c["comparison"] == "vs_none") & (c["outliers"] == oe)
          & (c["metric"] == "id_acc"), _accuracy_kept),
)


def decide_claims(comparisons: pd.DataFrame, oe_source: str = "labelmix") -> pd.DataFrame:
    """One row per (protocol, claim, loss, group, metric) with its verdict."""
    rows = []
    for claim in CLAIMS:
        for _, row in comparisons[claim.rows(comparisons, oe_source)].iterrows():
            rows.append({"protocol": row["protocol"], "claim": claim.text, "loss": row["loss"],
                         "outliers": row["outliers"], "group": row["group"],
                         "metric": row["metric"], "diff": row["diff"], "ci_low": row["ci_low"],
                         "ci_high": row["ci_high"], "verdict": claim.decide(row)})
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def overall(verdicts: pd.Series) -> str:
    if (verdicts == "fails").any():
        return "fails"
    return "holds" if (verdicts == "holds").all() else "undecided"


def claims_summary(claims: pd.DataFrame) -> pd.DataFrame:
    """One display row per (claim, protocol, group, metric): the verdict, the losses' counts
    and each loss's effect with its interval."""
    rows = []
    order = {c.text: i for i, c in enumerate(CLAIMS)}
    protocols = {"paper": 0, "openood": 1}  # the head's own output first: where OE acts
    keys = ["claim", "protocol", "group", "metric"]
    for key, part in sorted(claims.groupby(keys, sort=False), key=lambda kv: (
            order[kv[0][0]], protocols.get(kv[0][1], 2), GROUP_ORDER.get(kv[0][2], 2),
            kv[0][3] != "fpr95")):
        info = dict(zip(keys, key, strict=True))
        counts = part["verdict"].value_counts()
        effects = "; ".join(f"{r.loss} {r.diff:+.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}] "
                            f"{r.verdict}" for r in part.itertuples())
        rows.append({"claim": info["claim"], "protocol": info["protocol"],
                     "group": info["group"], "metric": METRIC_NAMES[info["metric"]],
                     "verdict": overall(part["verdict"]),
                     "losses (holds/fails/undecided)": "/".join(
                         str(int(counts.get(v, 0))) for v in ("holds", "fails", "undecided")),
                     "each loss: difference [95 % CI]": effects})
    return pd.DataFrame(rows)
