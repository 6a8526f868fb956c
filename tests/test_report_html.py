"""report.html: self-contained, and clean in a real headless Chromium (never skipped: `make test`
installs Debian's chromium where it is missing; without it these tests fail, naming the fix)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from oodscale.evaluate.report import aggregate, write_report
from oodscale.evaluate.report_check import check_report
from oodscale.evaluate.report_html import package_versions
from tests.report_data import GROUPS, toy_scores

PROVENANCE = {"config": "name: digits\nseed: 0\n", "commit": "0123abcd",
              "models": {"classifier softmax-none-s0": "feedface00000000"},
              "packages": package_versions()}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report for the module: rendering its plots is the slow part."""
    tmp_path = tmp_path_factory.mktemp("html")
    grid = tmp_path / "grid.png"
    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot().imshow(np.random.default_rng(0).random((8, 8)))
    fig.savefig(grid)
    scores = toy_scores()
    out = tmp_path / "eval"
    write_report(aggregate(scores, GROUPS), scores, str(out), "Test report",
                 {"Label-mixup outliers beside ID samples": str(grid)}, provenance=PROVENANCE)
    return out / "report.html"


def test_report_html_is_self_contained(report):
    page = report.read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    pngs = list((report.parent / "plots").glob("*.png"))
    assert len(sources) == len(pngs) + 1  # every plot and the outlier grid
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:|//|file:)', page)
    for needle in ("0123abcd", "feedface00000000", "pytorch-ood", "name: digits",
                   "Label-mixup outliers beside ID samples", 'class="best"',
                   "higher score = more in-distribution"):
        assert needle in page, needle
    # two per protocol (main, paired differences), claims, test sets, every score, per set;
    # then provenance's two
    assert page.count('<table class="sortable">') == 2 * 2 + 4 + 2


def test_a_real_browser_renders_the_report_without_errors(report, tmp_path):
    shot = tmp_path / "shot.png"
    assert check_report(report, screenshot=shot) == []
    assert shot.read_bytes().startswith(b"\x89PNG")


def test_the_browser_check_catches_console_errors_and_broken_images(report, tmp_path):
    page = report.read_text()
    path = tmp_path / "report.html"
    first = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = page[:first] + "AAAA" + page[first + 4:]  # a corrupt PNG header
    broken = broken.replace("</body>", '<script>console.error("boom")</script></body>')
    path.write_text(broken)
    problems = check_report(path)
    assert any("console.error: boom" in p for p in problems), problems
    assert any(p.startswith("image did not load or decode") for p in problems), problems
