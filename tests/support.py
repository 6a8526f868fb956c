"""Constants the test modules share, each defined once: the repository, the experiment configs,
and override fragments that shrink a run.

A helper module, not a test module: test modules import it (and the other helpers: faults.py,
experiment.py, kustomize.py, ...) and never one another (tests/test_structure.py checks). Light
on purpose (no torch), so that importing it costs a config-only test nothing.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "digits.yaml"  # the embedded experiment most tests run
CONFIG = str(DIGITS)  # as a command line takes it: main(["prepare", CONFIG, ...])
FASHION = REPO / "configs" / "fashion.yaml"

# One small built-in OOD set, made here (no image source to read): prepare stays quick.
SMALL_OOD = ["data.ood_sets=[gaussian]", "data.ood_samples=8"]
# No sample-quality figures (a reference classifier and extra DDPM samples per run): the tests
# that check them (test_pipeline, test_quality, test_fashion_gpu) ask for them themselves.
NO_QUALITY = ["diffusion.quality_per_class=0", "generate.quality_samples=0"]
# A grid of one cell, the plain softmax baseline without outliers, at one seed.
ONE_CELL = ["train.losses=[softmax]", "train.outliers=[none]", "train.seeds=[0]"]


def imagefolder(path: Path, image_size: int) -> list[str]:
    """Overrides that read the RGB ImageFolder tree under `path` as the ID data, every class
    kept, resized to `image_size`."""
    return ["data.source=imagefolder", f"data.path={path}", "data.id_classes=null",
            "data.channels=3", f"data.image_size={image_size}"]
