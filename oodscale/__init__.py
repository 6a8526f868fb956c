"""oodscale: deep metric learning with synthetic outlier exposure, on Ray.

`oodscale.Detector` (a trained, calibrated classifier as an OOD detector) is imported on first
use, so `import oodscale` and the CLI start without loading torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Detector", "Prediction"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from oodscale import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'oodscale' has no attribute {name!r}")
