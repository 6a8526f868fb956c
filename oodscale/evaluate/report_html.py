"""`report.html`: the report as one self-contained file people open in a browser.

The same content as report.md (built once by `report.build_report` from the two Parquet
frames), with sortable tables, every plot embedded as base64 PNG, and what produced it: the
config, model hashes, package versions and git commit. No network, no external files: the file
can be mailed or attached to a ticket and still shows everything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from oodscale.errors import InputError

if TYPE_CHECKING:
    from oodscale.config import ExperimentConfig
    from oodscale.evaluate.report import ReportContent, Table
    from oodscale.runtime import RunLayout

PACKAGES = ("oodscale", "torch", "ray", "diffusers", "accelerate", "pytorch-metric-learning",
            "pytorch-ood", "webdataset", "numpy", "pandas", "pyarrow", "scikit-learn")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Click a header to sort by it; again to reverse. Numbers ("12.3 ± 0.4", "-") sort as numbers.
SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(th => {
  th.addEventListener("click", () => {
    const col = th.cellIndex;
    const body = th.closest("table").tBodies[0];
    const asc = th.getAttribute("aria-sort") !== "ascending";
    th.closest("tr").querySelectorAll("th").forEach(h => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    const key = tr => {
      const text = tr.cells[col].textContent.trim();
      const num = parseFloat(text);
      return Number.isNaN(num) ? text : num;
    };
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      const cmp = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0)
                                        : (typeof x === "number" ? -1 : 1);
      return asc ? cmp : -cmp;
    });
    rows.forEach(r => body.appendChild(r));
  });
});
"""

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222;
       padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
td:nth-child(-n+3), th:nth-child(-n+3) { text-align: left; }
td.best { font-weight: bold; background: #e8f5e9; }
figure { display: inline-block; margin: 0 1em 1.5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
code { background: #f2f2f2; padding: 0 3px; }
"""


def _inline(text: str) -> str:
    """Escaped text with the report's Markdown `code` and **bold** as HTML."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _table(table: Table) -> str:
    frame = table.frame
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for i in range(len(frame)):
        cells = []
        for j, col in enumerate(frame.columns):
            best = table.best is not None and bool(table.best.iat[i, j])
            cls = ' class="best"' if best else ""
            cells.append(f"<td{cls}>{html.escape(str(frame[col].iat[i]))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _png_data_uri(path: Path) -> str:
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise InputError(f"{path} is not a PNG, so report.html cannot embed it; regenerate it "
                         "(rerun `oodscale report`)")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _provenance_html(prov: dict[str, Any]) -> str:
    def kv_table(title: str, pairs: dict[str, str]) -> str:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in pairs.items())
        return (f"<h3>{title}</h3><table class=\"sortable\"><thead><tr><th>name</th>"
                f"<th>value</th></tr></thead><tbody>{rows}</tbody></table>")

    return "".join([
        f"<p>Git commit: <code>{html.escape(prov['commit'])}</code></p>",
        kv_table("Models (sha256 of the weights, first 16 hex digits)", prov["models"]),
        kv_table("Package versions", prov["packages"]),
        f"<h3>Config</h3><pre>{html.escape(prov['config'])}</pre>",
    ])


def html_report(content: ReportContent, out_dir: str, prov: dict[str, Any]) -> str:
    """The whole page as one string; images read from `out_dir` and embedded."""
    parts = [f"<h1>{html.escape(content.title)}</h1>", "<h2>Conventions</h2><ul>",
             *[f"<li>{_inline(line)}</li>" for line in content.conventions], "</ul>"]
    for table in content.tables:
        parts.append(f"<h2>{html.escape(table.title)}</h2>")
        if table.note:
            parts.append(f"<p>{_inline(table.note)}</p>")
        parts.append(_table(table))
    parts.append("<h2>Plots</h2>")
    for caption, rel in content.figures:
        uri = _png_data_uri(Path(out_dir) / rel)
        parts.append(f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += ["<h2>Provenance</h2>", _provenance_html(prov)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(content.title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + f"\n<script>{SORT_JS}</script>\n</body></html>\n")


def write_html(content: ReportContent, out_dir: str, prov: dict[str, Any]) -> Path:
    path = Path(out_dir) / "report.html"
    path.write_text(html_report(content, out_dir, prov), encoding="utf-8")
    return path


def _git_commit() -> str:
    """HEAD of the checkout oodscale runs from, '+dirty' with uncommitted changes."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (oodscale is not running from a git checkout)"
    return head + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(cfg: ExperimentConfig, layout: RunLayout, runs: list[str]) -> dict[str, Any]:
    """What produced this report: the config, each model's weight hash, versions, the commit."""
    import json

    from oodscale.classify.cards import WEIGHTS

    storage = layout.storage
    models = {}
    diffusion_card = f"{layout.diffusion_dir}/model.json"
    if storage.exists(diffusion_card):
        models["diffusion"] = json.loads(storage.read_bytes(diffusion_card))["model_hash"]
    for run in runs:
        weights = storage.read_bytes(f"{layout.classifier_dir(run)}/{WEIGHTS}")
        models[f"classifier {run}"] = hashlib.sha256(weights).hexdigest()[:16]
    return {"config": yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
            "models": models, "packages": package_versions(), "commit": _git_commit()}
