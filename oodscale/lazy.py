"""Implementations named by "module:attribute" strings, imported when first used.

The family tables (losses, scores, outlier sources, generators, backbones, dataset sources)
name their implementations this way, so reading a table, and so validating a config, imports
nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any


def load(implementation: str) -> Any:
    """The attribute an "module:attribute" string names (imported on first call)."""
    module, sep, attribute = implementation.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"implementation {implementation!r} is not of the form module:attribute")
    return getattr(importlib.import_module(module), attribute)
